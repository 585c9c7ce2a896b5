"""ASGI middleware that turns requests away before any body is read: foreign Host headers (DNS rebinding),
a missing or wrong API key, bodies over the size limit."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyla.serve.auth import ApiKeyCheck
from hyla.serve.errors import APIError, invalid_host, too_large, unauthorized

WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
OPEN_PATHS = {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def host_name(header: str) -> str:
    """The host of a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostPolicy:
    """Which Host headers to serve: loopback names and addresses always, the bound host, `allowed` ("*": any).

    A server bound to a wildcard address also takes any IP-address literal: only names can be rebound."""

    def __init__(self, bound_host: str, allowed: Iterable[str] = ()) -> None:
        allowed = [host_name(h) for h in allowed]
        self.any = "*" in allowed
        self.names = {"localhost", *allowed} | ({host_name(bound_host)} - WILDCARD_HOSTS)
        self.any_address = bound_host in WILDCARD_HOSTS

    def accepts(self, header: str) -> bool:
        name = host_name(header).rstrip(".")
        if self.any or name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_address


class HostCheck:
    """400 for a Host header the policy refuses (requests without one, not sent by browsers, pass)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope.get("headers", ())).get(b"host") if scope["type"] == "http" else None
        if host is not None and not self.policy.accepts(host.decode("latin-1")):
            return await error_response(invalid_host(host.decode("latin-1")))(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKeyGuard:
    """401 for a missing or wrong key on every path but `open_paths`, before the body is read."""

    def __init__(self, app: ASGIApp, check: ApiKeyCheck, open_paths: set[str]) -> None:
        self.app = app
        self.check = check
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = dict(scope["headers"]).get(b"authorization")
            if not self.check.accepts(header.decode("latin-1") if header is not None else None):
                return await error_response(unauthorized())(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length up front or by counting a streamed body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await error_response(too_large(self.limit))(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, counting_receive, send)
