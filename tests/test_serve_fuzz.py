"""Seeded fuzzing of the served OpenAPI spec against a live server: requests the spec allows must be answered
(never 5xx, never refused as malformed), arbitrary JSON must get a clean 4xx, and afterwards the server
still serves the right greedy output with an empty cache.

Generated requests are kept cheap (a few new tokens, n <= 2) so the run stays well under a minute on CPU.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread
from tests.test_serve_http import wait_idle
from tests.tiny_models import tiny_teacher_dir

PROMPT = "The capital of France is"
VALID_CASES = 300
JSON_CASES = 150
BODIES = {  # endpoint: request component
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}
# Valid requests may still be refused for what a schema cannot say: the prompt's length in tokens against
# the context, the request's total cost, and rules between fields.
SEMANTIC_REFUSALS = {"context_length_exceeded", "request_too_costly"}
CROSS_FIELD_PARAMS = {"best_of", "stream_options", "top_logprobs"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    model_dir = tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))
    engine = LLMEngine.from_config(EngineConfig(model=str(model_dir), cache_memory="64MiB", max_num_seqs=4))
    reference = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    with ServerThread(engine, ServerSettings("tiny", port=0, grpc_port=None, log_level="warning")) as server:
        yield server, reference


def cheap(schema: dict[str, Any]) -> dict[str, Any]:
    """The spec's request schema with generation kept short: few new tokens, n <= 2, bounded lists."""
    schema = copy.deepcopy(schema)
    properties = schema.get("properties", {})
    for name in ("max_tokens", "max_completion_tokens"):
        if name in properties:
            properties[name] = {"type": "integer", "minimum": 0, "maximum": 4}
    if "n" in properties:
        properties["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
    if "max_completion_tokens" in properties:  # chat's default is the rest of the context
        schema["required"] = [*schema.get("required", []), "max_completion_tokens"]
    return schema


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
ANNOTATIONS = {"title", "description", "default", "anyOf"}


def non_null(schema: dict[str, Any]) -> dict[str, Any]:
    return schema | {"anyOf": [b for b in schema["anyOf"] if b.get("type") != "null"]} if "anyOf" in schema else schema


def instances(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under `schema`, for the JSON Schema keywords the served spec uses."""
    if "$ref" in schema:
        return instances(components[schema["$ref"].rsplit("/", 1)[-1]], components)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    if "anyOf" in schema:  # constraints beside anyOf apply to every branch
        shared = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        return st.one_of([instances(shared | branch, components) for branch in schema["anyOf"]])
    if "oneOf" in schema:  # branches that each make some fields non-null: those set, the others' null
        base = {k: v for k, v in schema.items() if k != "oneOf"}
        branches = []
        for branch in schema["oneOf"]:
            others = {f: {"type": "null"} for b in schema["oneOf"] if b is not branch for f in b["required"]}
            chosen = {f: non_null(base["properties"][f]) for f in branch["required"]}
            branches.append(base | {"required": [*base.get("required", []), *branch["required"]],
                                    "properties": base["properties"] | others | chosen})
        return st.one_of([instances(b, components) for b in branches])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in schema)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 40))
    if kind == "array":
        items = instances(schema.get("items", {}), components) if schema.get("items") else JSON_VALUES
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", ()))
        fields = {name: instances(sub, components) for name, sub in schema["properties"].items()}
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
    extra = schema.get("additionalProperties", True)
    values = instances(extra, components) if isinstance(extra, dict) else JSON_VALUES
    return st.dictionaries(st.text(max_size=12), values, max_size=schema.get("maxProperties", 3))


def request_strategy(spec: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
    components = spec["components"]["schemas"]
    strategies = []
    for path, name in BODIES.items():
        body_schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema == {"$ref": f"#/components/schemas/{name}"}
        strategies.append(st.tuples(st.just(path), instances(cheap(components[name]), components)))
    return st.one_of(strategies)
FIELD_NAMES = st.sampled_from(["prompt", "messages", "max_tokens", "n", "stop", "logprobs", "echo", "stream",
                               "temperature", "tokens", "seed", "top_logprobs", "stream_options", "model"])
LOOSE_BODIES = st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=5) | JSON_VALUES


def refusal_is_semantic(error: dict[str, Any]) -> bool:
    return error.get("code") in SEMANTIC_REFUSALS or error.get("param") in CROSS_FIELD_PARAMS


def check_answer(response: httpx.Response) -> None:
    """Whatever the status, a well-formed answer: a JSON error object, or SSE ending in [DONE]."""
    assert response.status_code < 500, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    elif response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}


def test_fuzz_the_openapi_spec(served):
    server, reference = served
    http = httpx.Client(base_url=server.base_url, timeout=60)
    spec = http.get("/openapi.json").json()
    counts: Counter[str] = Counter()
    started = time.monotonic()

    @seed(20240611)
    @settings(max_examples=VALID_CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request_strategy(spec))
    def valid_requests(case: tuple[str, Any]) -> None:
        path, body = case
        response = http.post(path, json=body)
        check_answer(response)
        counts[f"valid {response.status_code}"] += 1
        if response.status_code == 400:
            error = response.json()["error"]
            assert refusal_is_semantic(error), (path, body, response.text)
            counts[f"valid 400 by {error['code'] or error['param']}"] += 1

    @seed(20240612)
    @settings(max_examples=JSON_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(BODIES)), LOOSE_BODIES)
    def arbitrary_json(path: str, body: Any) -> None:
        response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        check_answer(response)
        counts[f"loose {response.status_code}"] += 1

    try:
        valid_requests()
        arbitrary_json()
        elapsed = time.monotonic() - started
        cases = sum(v for k, v in counts.items() if " by " not in k)
        print(f"fuzzed {cases} requests in {elapsed:.1f} s: {dict(sorted(counts.items()))}")
        assert sum(v for k, v in counts.items() if k[6:].isdigit()) >= VALID_CASES * 0.9
        assert sum(v for k, v in counts.items() if k.startswith("valid 2")) >= VALID_CASES // 3
        wait_idle(server)
        reply = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert reply.json()["choices"][0]["text"] == reference
        assert http.get("/health").status_code == 200
        wait_idle(server)
    finally:
        http.close()
