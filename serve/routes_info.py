"""Model listing, tokenizer endpoints, health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, Response

from hyla.serve.errors import bad_request, engine_dead, shutting_down
from hyla.serve.http_common import ERROR_RESPONSES, served_model
from hyla.serve.protocol import (
    DetokenizeRequest, DetokenizeResponse, ErrorResponse, HealthResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse,
)
from hyla.serve.served_model import ServedModel

models_router = APIRouter()  # behind the API key, when there is one
tokenizer_router = APIRouter()  # likewise
metrics_router = APIRouter()  # open for scrapers unless the server protects it too
open_router = APIRouter()  # health: always open, for probes


def card(served: ServedModel) -> ModelCard:
    return ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len)


@models_router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]}, summary="List models")
async def list_models(served: ServedModel = Depends(served_model)) -> ModelList:
    return ModelList(data=[card(served)])


@models_router.get(
    "/v1/models/{model:path}", response_model=ModelCard,
    responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]}, summary="Retrieve a model",
)
async def retrieve_model(model: str, served: ServedModel = Depends(served_model)) -> ModelCard:
    """`model` may hold slashes (hub ids such as `org/name`)."""
    served.check_model(model)
    return card(served)


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, summary="Tokenize")
async def tokenize(body: TokenizeRequest, served: ServedModel = Depends(served_model)) -> TokenizeResponse:
    """Token ids of `prompt`, or of `messages` rendered with the chat template (exactly one of them)."""
    served.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        ids = await served.chat_prompt(body.messages, body.add_generation_prompt, within_context=False)
    else:
        ids = await served.encode(body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=served.max_model_len, tokens=ids,
                            token_strs=await served.token_texts(ids))


@tokenizer_router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, summary="Detokenize"
)
async def detokenize(body: DetokenizeRequest, served: ServedModel = Depends(served_model)) -> DetokenizeResponse:
    served.check_model(body.model)
    return DetokenizeResponse(prompt=await served.decode(body.tokens))


@open_router.get(
    "/health", response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "Shutting down, or the engine died"}}, summary="Liveness",
)
async def health(served: ServedModel = Depends(served_model)) -> HealthResponse | JSONResponse:
    error = engine_dead() if not served.alive else None if served.accepting else shutting_down()
    if error is not None:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())
    return HealthResponse()


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
async def metrics(served: ServedModel = Depends(served_model)) -> Response:
    body, content_type = served.metrics.render(await served.engine.current_stats())
    return Response(body, media_type=content_type)
