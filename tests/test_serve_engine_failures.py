"""Engine failures seen from the clients: a request the engine fails gets a server error (HTTP 500, an SSE error
event then `[DONE]`, gRPC INTERNAL) and the server carries on; a dead engine makes the server report unhealthy
and stop. Faults are injected into the model's forward pass, as a failing device would raise them."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.errors import EngineDead
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread
from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc
from tests.test_serve_http import metric, wait_idle
from tests.tiny_models import tiny_teacher_dir

PROMPT = "The capital of France is"


class Fault:
    """A forward pre-hook on the embedding that raises `error` while armed."""

    def __init__(self, engine: LLMEngine) -> None:
        self.error: type[BaseException] | None = None
        self._handle = engine.model.model.embed_tokens.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if self.error is not None:
            raise self.error("injected fault")

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))


def started(model_dir) -> tuple[ServerThread, Fault, str]:
    engine = LLMEngine.from_config(EngineConfig(model=str(model_dir), cache_memory="64MiB", max_num_seqs=4))
    reference = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    fault = Fault(engine)
    settings = ServerSettings("tiny", port=0, grpc_port=0, drain_timeout=1, log_level="warning")
    return ServerThread(engine, settings).start(), fault, reference


def check_failures_then_service(server: ServerThread, fault: Fault, reference: str, http: httpx.Client, stub) -> None:
    """Failed requests on both front ends (whole, mid-stream), their metrics, then correct service."""
    fault.error = RuntimeError
    whole = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_error"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(text=PROMPT), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    fault.error = None

    events: list[str] = []  # fails mid-stream: after the first chunk is out
    with http.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "ignore_eos": True, "stream": True,
    }) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                fault.error = RuntimeError
    fault.error = None
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"

    text = http.get("/metrics").text
    assert metric(text, 'hyla_requests_total{endpoint="/v1/completions",protocol="http",status="500"}') == 1
    assert metric(text, 'hyla_requests_total{endpoint="Generate",protocol="grpc",status="INTERNAL"}') == 1
    assert metric(text, 'hyla_request_failures_total{error="RequestFailed"}') == 3
    wait_idle(server)
    assert http.get("/health").status_code == 200
    good = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert good.json()["choices"][0]["text"] == reference
    sampling = pb.SamplingOptions(max_tokens=8, temperature=0)
    assert stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling)).completions[0].text == reference
    wait_idle(server)


def test_failed_requests_get_server_errors_and_the_server_carries_on(model_dir):
    server, fault, reference = started(model_dir)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http, \
                grpc.insecure_channel(server.grpc_target) as channel:
            check_failures_then_service(server, fault, reference, http, hyla_pb2_grpc.GenerationStub(channel))
    finally:
        fault.remove()
        server.stop()


def test_a_dead_engine_reports_unhealthy_then_stops_the_server(model_dir):
    server, fault, _ = started(model_dir)
    channel = grpc.insecure_channel(server.grpc_target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        fault.error = torch.AcceleratorError
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            dying = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
            assert dying.status_code == 500 and dying.json()["error"]["code"] == "engine_error"
            unhealthy = http.get("/health")
        assert unhealthy.status_code == 503 and unhealthy.json()["error"]["code"] == "engine_dead"
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        server.wait_stopped(30)
        assert isinstance(server.server.failure, EngineDead)
    finally:
        fault.remove()
        watch.cancel()
        channel.close()
