"""The FastAPI app: routes, guards (host, API key, body size), request metrics and OpenAI-style errors."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import hyla
from hyla.serve.auth import ApiKeyCheck
from hyla.serve.errors import APIError, internal_error, too_large, validation_error
from hyla.serve.http_guards import OPEN_PATHS, ApiKeyGuard, BodyLimit, HostCheck, HostPolicy, error_response
from hyla.serve.protocol import SEED_MAX, SEED_MIN
from hyla.serve.routes_chat import router as chat_router
from hyla.serve.routes_completions import router as completions_router
from hyla.serve.routes_info import metrics_router, models_router, open_router, tokenizer_router
from hyla.serve.served_model import ServedModel

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


class RequestCounter:
    """Counts answered requests by endpoint (route templates; anything else is "other", so scanners cannot
    blow up the label set) and status."""

    def __init__(self, app: ASGIApp, served: ServedModel, routes: list[BaseRoute]) -> None:
        self.app = app
        self.served = served
        self.routes = routes

    def endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.served.metrics.count("http", self.endpoint(scope), status)


def bound_token_ids(schema: Any, vocab_size: int) -> None:
    """Give every token-id schema (titled TokenId) the vocabulary's upper bound."""
    if isinstance(schema, dict):
        if schema.get("title") == "TokenId":
            schema["maximum"] = vocab_size - 1
        for value in schema.values():
            bound_token_ids(value, vocab_size)
    elif isinstance(schema, list):
        for value in schema:
            bound_token_ids(value, vocab_size)


def documented_key() -> Any:
    """Declares the bearer key in the OpenAPI schema; `ApiKeyGuard` checks it, before the body is read."""
    bearer = HTTPBearer(auto_error=False, description="The server's API key (`hyla serve --api-key`).")

    async def declared(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        return None

    return Depends(declared)


def build_app(
    served: ServedModel,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    hosts: HostPolicy | None = None,
    metrics_auth: bool = False,
) -> FastAPI:
    """The HTTP front end of `served`. With a key, `/health`, the docs and (unless `metrics_auth`) `/metrics`
    stay open; `hosts` defaults to loopback only."""
    app = FastAPI(
        title="hyla",
        version=hyla.__version__,
        summary="OpenAI-compatible completions and chat completions over a hybrid-attention model.",
    )
    app.state.served = served
    check = ApiKeyCheck(api_key)
    guarded = [documented_key()] if check.enabled else []
    routers = [completions_router, chat_router, models_router, tokenizer_router, metrics_router, open_router]
    for router in routers:
        keyed = router is not open_router and (router is not metrics_router or metrics_auth)
        app.include_router(router, dependencies=guarded if keyed else [])
    routes = [r for router in routers for r in router.routes]

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(error.errors())))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 413:
            return error_response(too_large(max_body_bytes))
        message = f"{error.detail}: {request.method} {request.url.path}"
        response = error_response(APIError(error.status_code, message, code=str(error.status_code)))
        response.headers.update(error.headers or {})  # e.g. Allow on 405
        return response

    @app.exception_handler(Exception)
    async def on_crash(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed: %s %s", request.method, request.url.path)
        return error_response(internal_error())

    def openapi() -> dict[str, Any]:
        """FastAPI's schema minus its 422 responses (validation errors are OpenAI-style 400s here), with what
        this server accepts: its model name, the vocabulary's token ids, exact seed bounds."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for component in components.values():
                properties = component.get("properties", {})
                if "anyOf" in properties.get("model", {}):
                    properties["model"]["anyOf"] = [{"type": "string", "enum": [served.name]}, {"type": "null"}]
                if "seed" in properties:  # FastAPI writes bounds as floats, and 2**64 - 1 does not survive that
                    properties["seed"]["anyOf"][0].update(minimum=SEED_MIN, maximum=SEED_MAX)
            bound_token_ids(components, served.vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if check.enabled:
        open_paths = OPEN_PATHS if metrics_auth else OPEN_PATHS | {"/metrics"}
        app.add_middleware(ApiKeyGuard, check=check, open_paths=open_paths)
    app.add_middleware(HostCheck, policy=hosts or HostPolicy("127.0.0.1"))
    app.add_middleware(RequestCounter, served=served, routes=routes)  # outermost: sees every status
    return app
