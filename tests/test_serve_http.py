"""The OpenAI-compatible HTTP front end, against a real server on 127.0.0.1 and real clients."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from openapi_spec_validator import validate as validate_spec

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.loading import load_model
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread
from tests.tiny_models import tiny_teacher_dir

KEY = "test-key"
PROMPTS = ["The capital of France is", "Once upon a time"]
MAX_WAITING = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), cache_memory="64MiB", max_num_seqs=4))


@pytest.fixture(scope="module")
def reference(engine):
    """Offline greedy outputs of the same engine, taken before it starts serving."""
    greedy = SamplingParams(max_tokens=8, temperature=0)
    chat_ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    completions = [out.outputs[0].text for out in engine.generate(PROMPTS, greedy)]
    chat = engine.generate([list(chat_ids)], greedy)[0].outputs[0].text
    return {"completions": completions, "chat": chat}


@pytest.fixture(scope="module")
def server(engine, reference):
    settings = ServerSettings("tiny", port=0, grpc_port=None, api_key=KEY, max_body_bytes=64 * 1024,
                              max_waiting=MAX_WAITING, log_level="warning")
    with ServerThread(engine, settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def wait_idle(server: ServerThread, timeout: float = 30) -> None:
    """Until the engine holds no requests, KV blocks or state slots (fails otherwise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.server.engine.stats()
        if not (stats.num_running or stats.num_waiting or stats.kv_blocks_used or stats.state_slots_used):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {server.server.engine.stats()}")


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# ---- the official openai client ------------------------------------------------------------------


def test_openai_completions_match_offline_engine(client, reference):
    reply = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == reference["completions"]
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"

    for index, prompt in enumerate(PROMPTS):
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["completions"][index]
        assert chunks[-1].usage.completion_tokens == 8


def test_openai_chat_matches_offline_engine(client, reference):
    messages = [{"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == reference["chat"]
    assert reply.choices[0].message.role == "assistant"

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference["chat"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_and_n(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=3, temperature=1.0, seed=7,
        logprobs=True, top_logprobs=2,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        assert len(choice.logprobs.content) == 4
        for item in choice.logprobs.content:
            assert len(item.top_logprobs) == 2 and item.logprob <= 0
            assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_seeded_sampling_repeats(client):
    def sample() -> list[str]:
        reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=2, temperature=1.0, seed=3)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    assert sample() == sample()


def test_echo_logprobs_equal_model_log_softmax(client, model_dir):
    """What lm-eval's loglikelihood sends: token-id prompt, echo, logprobs, max_tokens 0 and 1."""
    ids = [504, 3458, 282, 4649, 314, 3575, 30]
    model = load_model(str(model_dir))
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for max_tokens in (0, 1):
        reply = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, logprobs=1, echo=True,
                                          temperature=0)
        lp = reply.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert reply.choices[0].text.startswith(lp.tokens[0])
        assert reply.usage.prompt_tokens == len(ids)


# ---- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/completions", b"{", 400, None),
    ("/v1/completions", b'"just a string"', 400, None),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hello " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": [49152]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_server_keeps_serving(http, path, body, status, param):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    good = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert good.status_code == 200 and len(good.json()["choices"]) == 1


def test_non_json_content_type_and_unknown_route(http):
    response = http.post("/v1/completions", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and "error" in response.json()
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["message"]
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["message"]


def test_api_key_required(server):
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(server.base_url + "/v1/completions", json=body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_body_size_limit(http):
    response = http.post("/v1/completions", json={"prompt": "x" * 100_000, "max_tokens": 1})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    response = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_queue_full_gets_503_with_retry_after(http, server):
    response = http.post("/v1/completions", json={"prompt": [[7, 8, 9]] * (MAX_WAITING + 8), "max_tokens": 4})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "overloaded"
    wait_idle(server)
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_disconnect_burst_frees_every_block_and_slot(server, http):
    async def burst() -> None:
        body = {"prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as client:

            async def stream_then_leave() -> None:
                async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break  # leave mid-stream

            async def wait_then_leave() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/completions", json=body, timeout=0.5)

            await asyncio.gather(*[stream_then_leave() for _ in range(5)], *[wait_then_leave() for _ in range(3)])

    asyncio.run(burst())
    wait_idle(server)
    text = http.get("/metrics").text
    assert metric(text, "hyla_kv_blocks_used") == 0 and metric(text, "hyla_state_slots_used") == 0
    assert metric(text, "hyla_kv_blocks_total") > 0 and metric(text, "hyla_state_slots_total") > 0


# ---- models, tokenizer, health, metrics, OpenAPI --------------------------------------------------


def test_models_tokenize_detokenize(client, http, engine):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert http.get("/v1/models/other").status_code == 404
    reply = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert reply["tokens"] == engine.tokenizer("Hello world")["input_ids"] and reply["count"] == len(reply["tokens"])
    assert "".join(reply["token_strs"]) == "Hello world"
    assert http.post("/detokenize", json={"tokens": reply["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3 and reply["max_model_len"] == engine.max_model_len


def test_metrics_count_requests_tokens_and_latency(http):
    before = http.get("/metrics").text
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0}).status_code == 200
    assert http.post("/v1/completions", json={"prompt": 3}).status_code == 400
    after = http.get("/metrics").text
    ok = 'hyla_requests_total{endpoint="/v1/completions",protocol="http",status="200"}'
    bad = 'hyla_requests_total{endpoint="/v1/completions",protocol="http",status="400"}'
    assert metric(after, ok) == metric(before, ok) + 1 and metric(after, bad) == metric(before, bad) + 1
    assert metric(after, "hyla_generation_tokens_total") >= metric(before, "hyla_generation_tokens_total") + 3
    for name in ("hyla_time_to_first_token_seconds_count", "hyla_time_per_output_token_seconds_count",
                 "hyla_e2e_request_latency_seconds_count"):
        assert metric(after, name) == metric(before, name) + 1
    for name in ("hyla_num_requests_running", "hyla_num_requests_waiting", "hyla_prompt_tokens_total"):
        assert name in after


def test_prefix_cache_hits_in_usage_and_metrics(http):
    ids = list(range(1000, 1040))
    before = http.get("/metrics").text
    replies = [http.post("/v1/completions", json={"prompt": ids + [7] * extra, "max_tokens": 2, "temperature": 0})
               .json()["usage"] for extra in (1, 2)]
    after = http.get("/metrics").text
    # the first prompt's two full blocks and its last, partly filled one (kept at the prompt's end)
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in replies] == [0, 41]
    queries, hits = "hyla_prefix_cache_queries_total", "hyla_prefix_cache_hits_total"
    assert metric(after, queries) - metric(before, queries) == 41 + 42
    assert metric(after, hits) - metric(before, hits) == 41
    assert metric(after, "hyla_prefix_cache_blocks") >= 2 and "hyla_prefix_cache_snapshots" in after


def test_openapi_is_valid_and_describes_responses(http):
    spec = http.get("/openapi.json").json()
    validate_spec(spec)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
            "/metrics"} <= set(spec["paths"])
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    completions = spec["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(completions["responses"])
    assert completions["security"]  # the key is documented
    schemas = spec["components"]["schemas"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False

    def check(instance: object, name: str) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": spec["components"]})

    check(http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1, "echo": True, "logprobs": 2}).json(),
          "CompletionResponse")
    check(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                  "logprobs": True, "top_logprobs": 1}).json(),
          "ChatCompletionResponse")
    check(http.post("/v1/completions", json={"prompt": 1}).json(), "ErrorResponse")
    stream = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        check(json.loads(data), "CompletionResponse")
