"""One bad request must never stop the server: odd, hostile and engine-breaking requests against a live
server (HTTP and gRPC over one engine), then proof that it still serves the right greedy output with every
KV block and state slot free."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.client import HTTPResponse

import grpc
import httpx
import openai
import pytest
from typer.testing import CliRunner

from hyla.cli import app as cli
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import HylaServer, ServerSettings
from hyla.serve.background import ServerThread
from hyla.serve.cli import default_model_name
from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc
from tests.test_serve_http import metric, wait_idle
from tests.tiny_models import tiny_teacher_dir

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = [("authorization", f"Bearer {KEY}")]
NAME = "tests/tiny"  # a hub-style id, with a slash
PROMPT = "The capital of France is"
MAX_REQUEST_TOKENS = 65536
CHAT = [{"role": "user", "content": "Hi"}]
COSTLY = {"prompt": [[7] * 500] * 4, "n": 16, "echo": True, "logprobs": 20, "max_tokens": 0}  # 85 MB once
ENGINE_KILLERS = [  # sampling values that once broke the engine for everyone
    {"seed": 2**64 - 1, "n": 2, "temperature": 1.0},
    {"temperature": 1e-40},
    {"temperature": 5e-324},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny") / "model")


def new_engine(model_dir) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), cache_memory="64MiB", max_num_seqs=4))


@pytest.fixture(scope="module")
def reference(model_dir) -> str:
    """Greedy continuation of PROMPT from a fresh engine that never served."""
    return new_engine(model_dir).generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text


@pytest.fixture(scope="module")
def server(model_dir, reference):
    settings = ServerSettings(NAME, model_aliases=(str(model_dir),), port=0, grpc_port=0, api_key=KEY,
                              max_request_tokens=MAX_REQUEST_TOKENS, log_level="warning")
    with ServerThread(new_engine(model_dir), settings) as running:
        yield running


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield hyla_pb2_grpc.GenerationStub(channel)


def assert_serves_correctly(server: ServerThread, http: httpx.Client, stub, reference: str) -> None:
    """Both front ends give the fresh engine's greedy text, and nothing is left in the cache."""
    wait_idle(server)
    assert http.get("/health").status_code == 200
    reply = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == reference
    sampling = pb.SamplingOptions(max_tokens=8, temperature=0)
    assert stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), metadata=GRPC_AUTH).completions[0].text \
        == reference
    wait_idle(server)
    stats = server.server.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.state_slots_used == 0


def raw_json(text: str) -> bytes:
    """A JSON body as a client that escapes everything would send it (lone surrogates included)."""
    return text.encode()


# (path, body: dict or raw bytes, expected status, expected error code or None)
HTTP_CASES = [
    ("/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "mul", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant"},
    ]}, 200, None),
    ("/tokenize", {"messages": [], "prompt": None}, 400, "invalid_value"),
    ("/tokenize", {"prompt": None}, 400, None),
    ("/v1/completions", raw_json('{"prompt": "\\ud800abc", "max_tokens": 1}'), 400, "invalid_value"),
    ("/v1/completions", raw_json('{"prompt": "x", "stop": ["\\udfff"], "max_tokens": 1}'), 400, "invalid_value"),
    ("/v1/completions", raw_json('{"prompt": "x", "model": "\\ud800"}'), 400, "invalid_value"),
    ("/v1/completions", raw_json('{"prompt": "x", "logit_bias": {"\\ud800": 1}}'), 400, "invalid_value"),
    ("/v1/chat/completions", raw_json('{"messages": [{"role": "user", "content": "\\ud83d"}]}'), 400, "invalid_value"),
    ("/tokenize", raw_json('{"prompt": "a\\udc00"}'), 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "store": False, "metadata": {"k": "v"},
                              "service_tier": "auto", "parallel_tool_calls": True, "user": "u1"}, 200, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "store": True, "metadata": {}, "user": "u"}, 200, None),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "tool_choice": "none"}, 200, None),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "response_format": {"type": "text"}}, 200, None),
    ("/v1/completions", COSTLY, 400, "request_too_costly"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi " * 600}, 400, "context_length_exceeded"),
    *[("/v1/completions", {"prompt": PROMPT, "max_tokens": 4} | killer, 200, None) for killer in ENGINE_KILLERS],
    *[("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4} | killer, 200, None) for killer in ENGINE_KILLERS],
]


def test_odd_and_hostile_http_requests_then_still_serving(server, http, stub, reference):
    for path, body, status, code in HTTP_CASES:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        assert response.status_code == status, (path, body, response.text)
        if status >= 400:
            error = response.json()["error"]
            assert error["message"] and (code is None or error["code"] == code), (body, error)
    too_costly = http.post("/v1/completions", json=COSTLY).json()["error"]["message"]
    assert str(MAX_REQUEST_TOKENS) in too_costly and "max_tokens" in too_costly
    text = http.get("/metrics").text
    assert not [line for line in text.splitlines() if line.startswith("hyla_requests_total") and 'status="5' in line]
    assert_serves_correctly(server, http, stub, reference)


def test_openai_client_with_tool_turns_ignored_fields_and_hub_style_id(server, model_dir, reference):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve(NAME).id == NAME and [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError, match="serves 'tests/tiny'"):
        client.models.retrieve("other/model")
    reply = client.chat.completions.create(
        model=NAME, max_tokens=2, store=False, metadata={"a": "b"}, service_tier="auto", user="me",
        messages=[*CHAT, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "done"}],
    )
    assert reply.model == NAME and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=CHAT, response_format={"type": "json_object"})
    assert caught.value.code == "unsupported_parameter"
    completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == reference
    by_path = client.completions.create(model=str(model_dir), prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_path.model == NAME and by_path.choices[0].text == reference  # accepted, never shown


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_stream_chunks_omit_role_after_the_first_and_usage_unless_asked(http):
    body = {"messages": CHAT, "max_tokens": 4, "n": 2, "stream": True}
    chunks = [json.loads(e) for e in sse_events(http.post("/v1/chat/completions", json=body))[:-1]]
    for index in (0, 1):
        deltas = [c["delta"] for chunk in chunks for c in chunk["choices"] if c["index"] == index]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert all("usage" not in chunk for chunk in chunks)
    with_usage = sse_events(http.post("/v1/chat/completions", json=body | {"stream_options": {"include_usage": True}}))
    last = json.loads(with_usage[-2])
    assert last["usage"]["completion_tokens"] == 8 and last["choices"] == []
    completion_chunks = sse_events(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}))
    assert completion_chunks[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in completion_chunks[:-1])


def test_kept_alive_connections_answer_without_delayed_ack_stalls(server):
    """TCP_NODELAY on accepted sockets: small responses on a kept-alive connection are not held back
    (~44 ms each without it)."""
    with httpx.Client(base_url=server.base_url) as client:
        latencies = []
        for _ in range(20):
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
    assert sorted(latencies)[10] < 0.02, latencies


def test_405_carries_allow(http):
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.headers["Allow"] == "POST" and response.json()["error"]


def test_client_leaving_a_non_streaming_request_is_counted_499(server, http):
    label = 'hyla_requests_total{endpoint="/v1/completions",protocol="http",status="%s"}'
    before = http.get("/metrics").text

    async def leave() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"prompt": "Go", "max_tokens": 400, "ignore_eos": True},
                                  timeout=0.5)

    asyncio.run(leave())
    wait_idle(server)
    deadline = time.monotonic() + 10
    while metric(http.get("/metrics").text, label % 499) == metric(before, label % 499):
        assert time.monotonic() < deadline, "the disconnect was not counted as 499"
        time.sleep(0.05)
    assert metric(http.get("/metrics").text, label % 500) == metric(before, label % 500)


def test_huge_prompts_do_not_stall_other_clients(server, http):
    """A 10 MB prompt is refused quickly; tokenising a large text runs off the event loop meanwhile /health
    answers promptly."""
    latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        start = time.monotonic()
        response = http.post("/v1/completions", json={"prompt": "hello world " * 900_000, "max_tokens": 1})
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - start < 10
        assert http.post("/tokenize", json={"prompt": "hello world " * 60_000}).json()["count"] >= 100_000
    finally:
        done.set()
        poller.join()
    assert len(latencies) > 5 and max(latencies) < 1.0, max(latencies)


def test_api_key_is_checked_before_the_body_is_read(server):
    """A client with no key that announces a large body is turned away without the server waiting for it."""
    port = server.server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n{")
        reply = HTTPResponse(sock)  # reads the whole body, which may trail the headers
        reply.begin()
        body = reply.read().decode()
    assert reply.version == 11 and reply.status == 401 and "invalid_api_key" in body


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 400), ("evil.example:8000", 400), ("localhost", 200), ("localhost:1234", 200),
    ("127.0.0.1", 200), ("127.8.9.10:80", 200), ("[::1]:8000", 200), ("[::1]", 200), ("10.1.2.3", 400),
])
def test_host_header_must_be_loopback(server, host, status):
    response = httpx.get(server.base_url + "/health", headers={"Host": host})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"]["code"] == "invalid_host"


# ---- gRPC -----------------------------------------------------------------------------------------


def grpc_code(call, request) -> grpc.StatusCode:
    try:
        call(request)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_grpc_limits_duplicates_and_info_then_still_serving(server, http, stub, reference):
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=GRPC_AUTH)
    assert info.model == NAME and list(info.eos_token_ids) == server.server.engine.engine.eos_token_ids
    assert list(info.eos_token_ids)

    def unary(request):
        return stub.Generate(request, metadata=GRPC_AUTH)

    def streamed(request):
        return list(stub.GenerateStream(request, metadata=GRPC_AUTH))

    bad = [
        pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(stop=[f"s{i}" for i in range(17)])),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 300),
                           sampling=pb.SamplingOptions(n=16, logprobs=20, prompt_logprobs=20, max_tokens=100)),
        pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(logprobs=21)),
        pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=10**6)),
    ]
    for request in bad:
        for call in (unary, streamed):
            assert grpc_code(call, request) == grpc.StatusCode.INVALID_ARGUMENT
    for killer in ENGINE_KILLERS:
        request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(max_tokens=4, **killer))
        assert grpc_code(unary, request) == grpc.StatusCode.OK and grpc_code(streamed, request) == grpc.StatusCode.OK

    long = pb.GenerateRequest(text="Go", request_id="same-id",
                              sampling=pb.SamplingOptions(max_tokens=400, ignore_eos=True))
    running = stub.GenerateStream(long, metadata=GRPC_AUTH)
    next(running)
    assert grpc_code(unary, long) == grpc.StatusCode.ALREADY_EXISTS
    running.cancel()

    expected = [("Generate", "INVALID_ARGUMENT", 4), ("GenerateStream", "INVALID_ARGUMENT", 4),
                ("Generate", "ALREADY_EXISTS", 1), ("GenerateStream", "CANCELLED", 1)]
    labels = {f'hyla_requests_total{{endpoint="{m}",protocol="grpc",status="{c}"}}': least for m, c, least in expected}
    deadline = time.monotonic() + 10  # the cancelled stream is counted once its handler has unwound
    while True:
        text = http.get("/metrics").text
        short = [label for label, least in labels.items() if metric(text, label) < least]
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not short, short
    assert 'protocol="grpc",status="INTERNAL"' not in text
    assert_serves_correctly(server, http, stub, reference)


# ---- start-up options, drain ----------------------------------------------------------------------


def test_empty_api_key_is_refused_at_start_up(model_dir):
    for args, env in ((["--api-key", ""], {}), ([], {"HYLA_API_KEY": ""})):
        result = CliRunner().invoke(cli, ["serve", str(model_dir), *args], env=env)
        assert result.exit_code != 0 and "API key is empty" in result.output
    with pytest.raises(ValueError, match="empty"):
        HylaServer(new_engine(model_dir), ServerSettings("m", api_key=""))


def test_default_model_name_is_the_folder_name(model_dir):
    assert default_model_name(str(model_dir)) == default_model_name(str(model_dir) + "/") == "model"
    assert default_model_name("org/some-model") == "org/some-model"  # a hub id, not a local folder


def test_drain_timeout_metrics_auth_and_allowed_hosts(model_dir):
    settings = ServerSettings("tiny", port=0, grpc_port=None, api_key=KEY, metrics_auth=True,
                              allowed_hosts=("serve.example",), drain_timeout=0.5, log_level="warning")
    server = ServerThread(new_engine(model_dir), settings).start()
    try:
        assert httpx.get(server.base_url + "/metrics").status_code == 401
        assert httpx.get(server.base_url + "/metrics", headers=AUTH).status_code == 200
        assert httpx.get(server.base_url + "/health", headers={"Host": "serve.example:80"}).status_code == 200
        assert httpx.get(server.base_url + "/health", headers={"Host": "other.example"}).status_code == 400

        long = {"prompt": "Go", "max_tokens": 480, "ignore_eos": True}
        results: dict[str, httpx.Response] = {}

        def call(kind: str) -> None:
            results[kind] = httpx.post(server.base_url + "/v1/completions", headers=AUTH, timeout=60,
                                       json=long | {"stream": kind == "stream"})

        callers = [threading.Thread(target=call, args=(kind,)) for kind in ("whole", "stream")]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 10
        while server.server.engine.stats().num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.server.request_shutdown()
        for caller in callers:
            caller.join(30)
    finally:
        server.stop()
    whole = results["whole"]
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "shutting_down"
    events = sse_events(results["stream"])
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
