"""Typed errors that cross from the runtime to its callers (the front ends map them to statuses).

Callers match on these types, never on message text.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine cannot take as given; `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DuplicateRequestId(InvalidRequest):
    """A request id that is already in flight."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} is already in use", param="request_id")
        self.request_id = request_id


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineShutdown(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class RequestFailed(RuntimeError):
    """The engine failed while running this request; the request is finished and its cache freed,
    the engine carries on with the others."""


class EngineDead(RuntimeError):
    """The engine cannot carry on; the process should report unhealthy and exit."""
