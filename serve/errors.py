"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error a client caused or should back off from; both front ends turn it into their own status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported_parameter")


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist; this server serves '{served}'", param="model", code="model_not_found"
    )


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body larger than {limit} bytes", code="request_too_large")


def overloaded(retry_after: float) -> APIError:
    return APIError(
        503, "The server is at capacity; retry later", type="server_overloaded", code="overloaded", retry_after=retry_after
    )


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down", type="server_overloaded", code="shutting_down", retry_after=5)


def drained() -> APIError:
    return APIError(
        503, "The server shut down before this request finished", type="server_overloaded", code="shutting_down",
        retry_after=5,
    )


def duplicate_request_id(message: str) -> APIError:
    return APIError(409, message, param="request_id", code="duplicate_request_id")


def too_costly(cost: int, limit: int) -> APIError:
    return APIError(
        400,
        f"This request asks for {cost} token positions (prompts x n x (logprobs + 1) x (max_tokens + echoed "
        f"prompt tokens)), more than this server's limit of {limit} per request; send fewer prompts or a smaller "
        "n, logprobs or max_tokens",
        code="request_too_costly",
    )


def invalid_host(host: str) -> APIError:
    return APIError(
        400, f"Host {host!r} is not served here (allowed hosts: see `hyla serve --allowed-hosts`)", code="invalid_host"
    )


def internal_error() -> APIError:
    return APIError(500, "The server failed to process the request; see its log", type="server_error")


def engine_dead() -> APIError:
    return APIError(503, "The engine stopped working; the server is exiting", type="server_error", code="engine_dead")


def engine_failed() -> APIError:
    return APIError(500, "The engine failed while running this request; see the server log", type="server_error",
                    code="engine_error")


def _is_field(part: object) -> bool:
    """Location parts that name fields or indices, not pydantic's union-member tags ("str", "list[int]")."""
    return isinstance(part, int) or (str(part).isidentifier() and str(part) not in {"str", "int", "float", "bool"})


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic / FastAPI validation error as an OpenAI-style 400."""
    if not errors:
        return bad_request("Invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: it is not valid JSON "
            f"({first.get('ctx', {}).get('error', 'syntax error')})",
            code="invalid_json",
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and _is_field(part)]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if first.get("type") == "missing" and param is None:
        return bad_request("The request body is missing or empty", code="invalid_json")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    prefixed = param is not None and not message.startswith(param.rsplit(".", 1)[-1])
    return bad_request(f"{param}: {message}" if prefixed else message, param=param, code="invalid_value")
