"""The gRPC front end: generated stubs against a real server, health, reflection, cancellation, errors."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread
from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc
from tests.tiny_models import tiny_teacher_dir

KEY = "grpc-key"
AUTH = [("authorization", f"Bearer {KEY}")]
PROMPT = "The capital of France is"
MAX_WAITING = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    path = tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))
    return LLMEngine.from_config(EngineConfig(model=str(path), cache_memory="64MiB", max_num_seqs=4))


@pytest.fixture(scope="module")
def reference(engine):
    return engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0]


@pytest.fixture(scope="module")
def server(engine, reference):
    settings = ServerSettings("tiny", port=0, grpc_port=0, api_key=KEY, max_waiting=MAX_WAITING, log_level="warning")
    with ServerThread(engine, settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return hyla_pb2_grpc.GenerationStub(channel)


def greedy(max_tokens: int = 8, **extra: object) -> pb.SamplingOptions:
    return pb.SamplingOptions(max_tokens=max_tokens, temperature=0, **extra)


def wait_idle(server: ServerThread, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.server.engine.stats()
        if not (stats.num_running or stats.num_waiting or stats.kv_blocks_used or stats.state_slots_used):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {server.server.engine.stats()}")


def test_unary_and_streaming_match_offline_engine(stub, reference):
    reply = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=greedy()), metadata=AUTH)
    out = reference.outputs[0]
    assert reply.completions[0].text == out.text and list(reply.completions[0].token_ids) == out.token_ids
    assert reply.completions[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert list(reply.prompt_token_ids) == reference.prompt_token_ids
    assert reply.usage.completion_tokens == 8 and reply.usage.total_tokens == 8 + len(reference.prompt_token_ids)

    messages = list(stub.GenerateStream(pb.GenerateRequest(text=PROMPT, sampling=greedy()), metadata=AUTH))
    assert "".join(c.text for m in messages for c in m.completions) == out.text
    assert [t for m in messages for c in m.completions for t in c.token_ids] == out.token_ids
    assert list(messages[0].prompt_token_ids) == reference.prompt_token_ids
    assert messages[-1].usage.completion_tokens == 8


def test_usage_reports_cached_prompt_tokens(stub):
    ids = list(range(2000, 2040))
    cached = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids + tail), sampling=greedy(2)),
                            metadata=AUTH).usage.prompt_tokens_details.cached_tokens for tail in ([5], [5, 6])]
    assert cached == [0, 41]


def test_token_ids_prompt_logprobs_and_n(stub):
    ids = [504, 3458, 282, 4649]
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingOptions(max_tokens=3, n=2, seed=1, logprobs=2,
                                                                     prompt_logprobs=1),
    )
    reply = stub.Generate(request, metadata=AUTH)
    assert [c.index for c in reply.completions] == [0, 1]
    assert len(reply.prompt_logprobs) == len(ids) and not reply.prompt_logprobs[0].HasField("chosen")
    assert [p.chosen.token_id for p in reply.prompt_logprobs[1:]] == ids[1:]
    for completion in reply.completions:
        assert len(completion.logprobs) == 3
        assert all(p.chosen.token_id == t for p, t in zip(completion.logprobs, completion.token_ids))
        assert all(p.top[0].rank == 1 and len(p.top) >= 2 for p in completion.logprobs)


def test_tokenize_and_model_info(stub, engine):
    reply = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), metadata=AUTH)
    assert list(reply.token_ids) == engine.tokenizer("Hello world")["input_ids"]
    assert "".join(reply.tokens) == "Hello world"
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=AUTH)
    assert info.model == "tiny" and info.max_model_len == engine.max_model_len and info.vocab_size == 49152
    assert info.layer_types == "AA" and info.kv_blocks_total > 0 and info.state_slots_total > 0


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "hyla.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"hyla.v1.Generation", "grpc.health.v1.Health"} <= services
    replies = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="hyla.v1.Generation")])
    ))
    assert replies[0].file_descriptor_response.file_descriptor_proto  # generic tools can describe us


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.GenerateRequest(sampling=greedy()), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[49152])), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text="hi " * 600), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text="hi", sampling=greedy(max_tokens=100_000)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(n=99)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_status_and_server_keeps_serving(stub, request_, code):
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request_, metadata=AUTH)
        assert caught.value.code() == code and caught.value.details()
    assert stub.Generate(pb.GenerateRequest(text="hi", sampling=greedy(2)), metadata=AUTH).completions[0].token_ids


def test_api_key_metadata(stub, channel):
    for metadata in ([], [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel)  # probes need no key
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_frees_the_cache(stub, server):
    long = pb.GenerateRequest(text="Tell me a story", sampling=pb.SamplingOptions(max_tokens=400, ignore_eos=True))
    streams = [stub.GenerateStream(long, metadata=AUTH) for _ in range(3)]
    for stream in streams:
        next(stream)  # it is running
        stream.cancel()
    unary = stub.Generate.future(long, metadata=AUTH)
    time.sleep(0.3)
    unary.cancel()
    assert server.server.engine.stats().generation_tokens_total > 0
    wait_idle(server)


def test_queue_full_is_resource_exhausted(stub, server):
    long = pb.GenerateRequest(text="Busy", sampling=pb.SamplingOptions(max_tokens=400, ignore_eos=True))
    futures = [stub.Generate.future(long, metadata=AUTH) for _ in range(16)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(f.done() for f in futures):
        time.sleep(0.02)
    time.sleep(0.2)
    rejected = [f for f in futures if f.done()]
    accepted = [f for f in futures if not f.done()]
    assert rejected and len(accepted) >= MAX_WAITING  # running + waiting ones go on
    for future in rejected:
        assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(future.exception().trailing_metadata())["retry-after"] == "1"
    for future in accepted:
        future.cancel()
    wait_idle(server)
