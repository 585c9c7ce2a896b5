"""`hyla bench serve`: an async load generator for OpenAI-compatible servers and hyla's gRPC port.

Fixed concurrency (N clients back to back) or an open-loop Poisson arrival rate; synthetic prompts
of a chosen length distribution or a prompts file; warm-up requests excluded from the numbers.
Streams every response to time the first token and the gaps between tokens. For prefix caching:
a common prefix in front of every prompt, and multi-turn chats (each turn resends the conversation
so far plus a new message); the summary reports the share of prompt tokens the server found cached.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


class LoadTestError(RuntimeError):
    """The target cannot be load-tested (unreachable, not an OpenAI-compatible API, ...)."""


@dataclass
class Workload:
    """What to send and how fast. Exactly one of `concurrency` / `rate` is set."""

    concurrency: int | None = 4
    rate: float | None = None
    num_requests: int | None = 32
    duration: float | None = None
    warmup: int = 2
    prompt_len: int = 128
    output_len: int = 64
    len_spread: float = 0.25
    prompts: list[str] | None = None
    seed: int = 0
    timeout: float = 300.0
    shared_prefix_len: int = 0
    """Words of one common prefix in front of every prompt (whose own part is then the suffix)."""
    turns: int = 1
    """Turns per conversation: each request is a chat whose later turns append the answer and a new
    message of ~prompt_len words."""

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency or rate")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give num_requests or duration")


@dataclass
class RequestResult:
    ok: bool
    start: float
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    turn: int = 0
    """Which turn of its conversation this request was (0: the first, the one with the shared prefix)."""
    text: str = ""
    error: str | None = None
    detail: str = ""
    """The server's message for a failed request (an OpenAI error object's `message`, a gRPC status's details)."""
    last: float = field(default=0.0, repr=False)
    """When the latest token-carrying event arrived."""

    def arrived(self) -> None:
        """A streamed event carrying new tokens: the first sets the time to first token, each later one
        adds its gap to the inter-token latencies."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now

    def finish(self) -> RequestResult:
        """A stream that ended without an error: its latency, and whether any token came."""
        self.latency = time.perf_counter() - self.start
        self.ok = self.ttft is not None
        self.error = None if self.ok else "empty_response"
        return self


def synthetic_prompts(workload: Workload, count: int) -> tuple[str, list[list[tuple[str, int]]]]:
    """The shared prefix ("" without one) and, per request, its turns' (message, max_tokens): essay
    text of ~prompt_len words (the first one after the shared prefix) and output lengths, both
    ±len_spread."""
    from hyla.evals.recall import haystack_sentences

    rng = random.Random(workload.seed)
    words = " ".join(haystack_sentences()).split()

    def jitter(n: int) -> int:
        return max(1, round(n * (1 + rng.uniform(-workload.len_spread, workload.len_spread))))

    def text(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    prefix = text(workload.shared_prefix_len) + " " if workload.shared_prefix_len else ""
    out = []
    for i in range(count):
        turns = []
        for turn in range(workload.turns):
            if workload.prompts and turn == 0:
                message = workload.prompts[i % len(workload.prompts)]
            else:
                message = text(jitter(workload.prompt_len))
            turns.append(((prefix if turn == 0 else "\n\n") + message, jitter(workload.output_len)))
        out.append(turns)
    return prefix, out


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; JSONL lines may be {"prompt": ...} objects."""
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class OpenAITarget:
    """Streaming `/v1/completions` client."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0):
        self.base = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.client = httpx.AsyncClient(base_url=self.base, headers=headers, timeout=timeout, limits=limits)
        self.model = model

    async def check(self) -> None:
        """Fail fast with a clear message when the URL does not answer like an OpenAI API."""
        try:
            reply = await self.client.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise LoadTestError(f"cannot reach {self.base}: {type(exc).__name__}: {exc or 'no response'}") from exc
        if reply.status_code in (401, 403):
            raise LoadTestError(f"{self.base} refused the API key (HTTP {reply.status_code}); pass --api-key")
        try:
            models = [m["id"] for m in reply.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise LoadTestError(
                f"{self.base} is not an OpenAI-compatible server: GET /v1/models gave HTTP {reply.status_code}"
            ) from exc
        if self.model is None:
            if not models:
                raise LoadTestError(f"{self.base} serves no models")
            self.model = models[0]

    async def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` from the server's `/tokenize` (hyla and vLLM have it), None without one."""
        try:
            reply = await self.client.post("/tokenize", json={"model": self.model, "prompt": text}, timeout=30.0)
            return int(reply.json()["count"]) if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    async def send(self, prompt: str, max_tokens: int) -> RequestResult:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
        }
        result = RequestResult(ok=False, start=time.perf_counter())
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    result.error, result.detail = f"http_{reply.status_code}", _error_message(reply)
                    return result
                async for line in reply.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        result.output_tokens = event["usage"].get("completion_tokens", 0)
                        result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                        details = event["usage"].get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens") or 0
                    choices = event.get("choices") or []
                    result.text += "".join(c.get("text") or "" for c in choices)
                    # a streamed token whose text is held back (part of a character) still arrives
                    if any(c.get("text") or c.get("finish_reason") is None for c in choices):
                        result.arrived()
        except httpx.TimeoutException:
            result.error = "timeout"
            return result
        except httpx.HTTPError as exc:
            result.error = type(exc).__name__
            return result
        events = 0 if result.ttft is None else len(result.itl) + 1
        result.output_tokens = result.output_tokens or events
        return result.finish()

    async def close(self) -> None:
        await self.client.aclose()


def _error_message(reply: httpx.Response) -> str:
    """The `message` of an OpenAI-style error body, else the body's start."""
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]


class GrpcTarget:
    """Streaming `hyla.v1.Generation/GenerateStream` client."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 300.0):
        import grpc.aio

        from hyla.serve.proto import hyla_pb2_grpc

        self.target, self.timeout = target, timeout
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = hyla_pb2_grpc.GenerationStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    async def check(self) -> None:
        import grpc

        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout=10.0)
        except asyncio.TimeoutError as exc:
            raise LoadTestError(f"cannot reach the gRPC server at {self.target} (no connection within 10 s)") from exc
        from hyla.serve.proto import hyla_pb2 as pb

        try:
            await self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata, timeout=10.0)
        except grpc.RpcError as exc:
            raise LoadTestError(f"{self.target} is not a hyla gRPC server: {exc.code().name}: {exc.details()}") from exc

    async def count_tokens(self, text: str) -> int | None:
        from hyla.serve.proto import hyla_pb2 as pb

        reply = await self.stub.Tokenize(pb.TokenizeRequest(text=text), metadata=self.metadata, timeout=30.0)
        return len(reply.token_ids)

    async def send(self, prompt: str, max_tokens: int) -> RequestResult:
        import grpc

        from hyla.serve.proto import hyla_pb2 as pb

        request = pb.GenerateRequest(
            text=prompt, sampling=pb.SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )
        result = RequestResult(ok=False, start=time.perf_counter())
        try:
            async for message in self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout):
                new = sum(len(c.token_ids) for c in message.completions)
                result.text += "".join(c.text for c in message.completions)
                if message.usage.prompt_tokens:
                    result.prompt_tokens = message.usage.prompt_tokens
                    result.cached_tokens = message.usage.prompt_tokens_details.cached_tokens
                if new:
                    result.arrived()
                    result.output_tokens += new
        except grpc.RpcError as exc:
            result.error, result.detail = f"grpc_{exc.code().name.lower()}", exc.details() or ""
            return result
        return result.finish()

    async def close(self) -> None:
        await self.channel.close()


async def run_workload(target, workload: Workload, progress: Callable[[int], None] | None = None) -> dict:
    """Warm up, then drive the target; returns the summary (see `summarize`)."""
    await target.check()
    count = workload.num_requests or 1_000_000
    prefix, requests = synthetic_prompts(workload, workload.warmup + min(count, 100_000))
    prefix_tokens = await target.count_tokens(prefix.rstrip()) if prefix else None
    for turns in requests[: workload.warmup]:
        await converse(target, turns)
    queue = iter(requests[workload.warmup :])
    deadline = time.perf_counter() + workload.duration if workload.duration else float("inf")
    results: list[RequestResult] = []
    began = time.perf_counter()

    async def one(turns: list[tuple[str, int]]) -> None:
        results.extend(await converse(target, turns))
        if progress:
            progress(1)

    if workload.concurrency is not None:

        async def client() -> None:
            for turns in queue:
                if time.perf_counter() >= deadline:
                    return
                await one(turns)

        await asyncio.gather(*(client() for _ in range(workload.concurrency)))
    else:
        rng = random.Random(workload.seed + 1)
        pending: list[Awaitable[None]] = []
        for turns in queue:
            if time.perf_counter() >= deadline:
                break
            pending.append(asyncio.ensure_future(one(turns)))
            await asyncio.sleep(rng.expovariate(workload.rate))
        await asyncio.gather(*pending)
    return summarize(results, time.perf_counter() - began, workload, prefix_tokens)


async def converse(target, turns: list[tuple[str, int]]) -> list[RequestResult]:
    """Send the turns of one conversation in order, each with everything said before it."""
    results: list[RequestResult] = []
    history = ""
    for turn, (message, max_tokens) in enumerate(turns):
        history += message
        result = await target.send(history, max_tokens)
        result.turn = turn
        results.append(result)
        if not result.ok:
            break
        history += result.text
    return results


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * scale

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered) * scale}


def summarize(
    results: list[RequestResult], elapsed: float, workload: Workload, prefix_tokens: int | None = None
) -> dict:
    """Throughput, latency percentiles (ms), error counts and prefix-cache hit rates of one run: of all
    prompt tokens, and of the shared prefix's `prefix_tokens` in each conversation's first request."""
    ok = [r for r in results if r.ok]
    firsts = [r for r in ok if r.turn == 0]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "workload": {k: v for k, v in asdict(workload).items() if k != "prompts"},
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "error_messages": {r.error: r.detail for r in reversed(results) if not r.ok and r.detail},
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed if elapsed else 0.0,
        "output_token_throughput": out_tokens / elapsed if elapsed else 0.0,
        "total_token_throughput": (out_tokens + prompt_tokens) / elapsed if elapsed else 0.0,
        "output_tokens": out_tokens,
        "prefix_cache_hit_rate": (sum(r.cached_tokens for r in ok) / prompt_tokens) if prompt_tokens else 0.0,
        "shared_prefix_tokens": prefix_tokens,
        "shared_prefix_hit_rate": (
            sum(min(r.cached_tokens, prefix_tokens) for r in firsts) / (prefix_tokens * len(firsts))
            if prefix_tokens and firsts else None
        ),
        "ttft_ms": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([g for r in ok for g in r.itl]),
        "latency_ms": _percentiles([r.latency for r in ok]),
    }


def format_table(runs: list[dict]) -> str:
    """A markdown table, one row per run."""
    head = (
        "| load | done | errors | req/s | out tok/s | cached | prefix cached | TTFT p50/p90/p99 ms "
        "| TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|"
    )
    rows = []
    for run in runs:
        w = run["workload"]
        load = f"concurrency {w['concurrency']}" if w["concurrency"] is not None else f"rate {w['rate']}/s"

        def trio(key: str) -> str:
            p = run[key]
            return "/".join("-" if p[q] is None else f"{p[q]:.0f}" for q in ("p50", "p90", "p99"))

        shared = run.get("shared_prefix_hit_rate")
        prefix = "-" if shared is None else f"{shared:.0%} of {run['shared_prefix_tokens']}"
        rows.append(
            f"| {load} | {run['completed']}/{run['requests']} | {sum(run['errors'].values())} | "
            f"{run['request_throughput']:.2f} | {run['output_token_throughput']:.1f} | "
            f"{run['prefix_cache_hit_rate']:.0%} | {prefix} | {trio('ttft_ms')} | "
            f"{trio('tpot_ms')} | {trio('itl_ms')} |"
        )
    failures = {kind: message for run in runs for kind, message in run.get("error_messages", {}).items()}
    notes = [f"{kind}: {message}" for kind, message in failures.items()]
    return "\n".join([head, *rows, *notes])


def plot_runs(runs: list[dict], path: str | Path) -> None:
    """Output tokens/s against TTFT and TPOT medians, one point per load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["output_token_throughput"] for r in runs]
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "tpot_ms", "time per output token")):
        y = [r[key]["p50"] or 0.0 for r in runs]
        ax.plot(x, y, marker="o")
        for r, xi, yi in zip(runs, x, y):
            w = r["workload"]
            ax.annotate(f"c={w['concurrency']}" if w["concurrency"] is not None else f"λ={w['rate']}", (xi, yi))
        ax.set_xlabel("output tokens / s")
        ax.set_ylabel(f"{title} p50 (ms)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
