"""`hyla serve`: one engine behind OpenAI-compatible HTTP and gRPC, until SIGTERM / Ctrl-C drains it."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import typer

EXAMPLE_PROMPT = "The capital of France is"


def local_address(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def default_model_name(model: str) -> str:
    """The name clients send by default: a local folder's own name (never its path), else MODEL as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def banner(model_name: str, host: str, http_port: int, grpc_port: int | None, with_key: bool) -> str:
    """The addresses and copy-paste examples printed at start-up."""
    address = local_address(host)
    base = f"http://{address}:{http_port}"
    body = json.dumps({"model": model_name, "prompt": EXAMPLE_PROMPT, "max_tokens": 16, "temperature": 0})
    auth = ' -H "Authorization: Bearer $HYLA_API_KEY"' if with_key else ""
    lines = [
        f"serving {model_name!r}",
        f"  HTTP (OpenAI-compatible)  {base}/v1   (docs {base}/docs, metrics {base}/metrics)",
    ]
    if grpc_port is not None:
        lines.append(f"  gRPC hyla.v1.Generation   {address}:{grpc_port}   (health and reflection on)")
    lines += ["try:", f"  curl -s {base}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"]
    if grpc_port is not None:
        lines.append(
            f"  python -m hyla.serve.grpc_client --target {address}:{grpc_port} --max-tokens 16 {shlex.quote(EXAMPLE_PROMPT)}"
        )
        grpc_body = json.dumps({"text": EXAMPLE_PROMPT, "sampling": {"max_tokens": 16, "temperature": 0}})
        key = ' -H "authorization: Bearer $HYLA_API_KEY"' if with_key else ""
        lines.append(f"  grpcurl -plaintext{key} -d {shlex.quote(grpc_body)} {address}:{grpc_port} hyla.v1.Generation/Generate")
    if with_key:
        lines.append("  (export HYLA_API_KEY=<the key> first)")
    lines.append("Ctrl-C or SIGTERM: finish in-flight requests, then exit.")
    return "\n".join(lines)


def serve(
    model: str = typer.Argument(..., help="Converted hybrid dir, HF dir / hub id, or alias (smollm2-135m)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; the default only accepts local clients."),
    port: int = typer.Option(8000, min=0, max=65535, help="HTTP port (0: any free port)."),
    grpc_port: int = typer.Option(50051, min=-1, max=65535, help="gRPC port (0: any free port, -1: no gRPC)."),
    api_key: str | None = typer.Option(
        None, envvar="HYLA_API_KEY", help="Require `Authorization: Bearer KEY` (HTTP header / gRPC metadata)."
    ),
    metrics_auth: bool = typer.Option(False, "--metrics-auth", help="Require the API key on /metrics too (default: open)."),
    allowed_hosts: list[str] = typer.Option(
        [], help="Host headers HTTP accepts besides loopback ones and the bound host; '*': any. Repeatable."
    ),
    served_model_name: str | None = typer.Option(
        None, help="Model name the server reports (default: the model folder's name, or MODEL as given); "
        "requests may also name MODEL as given."
    ),
    max_model_len: int | None = typer.Option(None, min=2, help="Context length (default: the model's, capped at 8192)."),
    cache_memory: str = typer.Option("2GiB", help="KV + state cache budget: bytes ('2GiB') or a fraction of free memory."),
    max_num_seqs: int = typer.Option(32, min=1, help="Sequences the engine runs at once."),
    max_num_batched_tokens: int = typer.Option(1024, min=1, help="Tokens per engine step (prefill chunks + decodes)."),
    max_waiting: int = typer.Option(256, min=1, help="Queued requests before new ones get 503 + Retry-After."),
    device: str = typer.Option("auto", help="cpu, cuda[:N], or auto (cuda when available)."),
    dtype: str = typer.Option("auto", help="Weights / KV dtype; auto: bfloat16 on cuda, float32 on cpu."),
    state_dtype: str = typer.Option("float32", help="Linear-attention state dtype."),
    enforce_eager: bool = typer.Option(
        False, "--enforce-eager", help="No CUDA graphs for decode and short prefill steps (they are captured at start-up on CUDA)."
    ),
    async_scheduling: bool | None = typer.Option(
        None, "--async-scheduling/--no-async-scheduling",
        help="Queue each decode step before the previous one's tokens reach the host (default: on CUDA only).",
    ),
    enable_prefix_caching: bool = typer.Option(
        True, "--enable-prefix-caching/--no-enable-prefix-caching",
        help="Keep computed KV blocks and linear-state snapshots for requests that share a prefix.",
    ),
    prefix_checkpoint_interval: int | None = typer.Option(
        None, min=1, help="Prompt tokens between linear-state snapshots, a multiple of the block size "
        "(default: 32 blocks, 512 tokens)."
    ),
    max_body_bytes: int = typer.Option(16 * 2**20, min=1024, help="Largest accepted HTTP request body (413 above)."),
    max_request_tokens: int = typer.Option(
        2**19, min=1, help="Most token positions one request may ask for: prompts x n x (logprobs + 1) x "
        "(max_tokens + echoed prompt tokens) (400 above)."
    ),
    drain_timeout: float = typer.Option(30.0, min=0, help="Seconds in-flight requests get to finish on shutdown."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-request access log."),
) -> None:
    """Serve a model over OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions) and gRPC."""
    import asyncio

    import torch

    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig
    from hyla.runtime.engine_thread import EngineThread
    from hyla.runtime.load_errors import ModelLoadError
    from hyla.runtime.loading import default_dtype
    from hyla.serve.app import HylaServer, ServerSettings

    if api_key is None and os.environ.get("HYLA_API_KEY") is not None:
        api_key = os.environ["HYLA_API_KEY"]  # set but empty: click reads that as unset
    if api_key is not None and not api_key.strip():
        raise typer.BadParameter(
            "the API key is empty; give a real key or none at all", param_hint="--api-key / HYLA_API_KEY"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = default_dtype(device)
    try:
        config = EngineConfig(
            model=model, device=device, dtype=dtype, state_dtype=state_dtype, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, cache_memory=cache_memory,
            enforce_eager=enforce_eager, async_scheduling=async_scheduling, enable_prefix_caching=enable_prefix_caching,
            prefix_checkpoint_interval=prefix_checkpoint_interval,
        )
        thread = EngineThread()
        engine = thread.call(LLMEngine.from_config, config)
    except ModelLoadError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except (ValueError, FileNotFoundError, OSError) as error:
        raise typer.BadParameter(str(error)) from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key; anyone who can reach it can use it", err=True)
    settings = ServerSettings(
        model_name=served_model_name or default_model_name(model), model_aliases=(model,), host=host, port=port,
        grpc_port=None if grpc_port < 0 else grpc_port, api_key=api_key, metrics_auth=metrics_auth,
        allowed_hosts=tuple(allowed_hosts), max_body_bytes=max_body_bytes, max_request_tokens=max_request_tokens,
        max_waiting=max_waiting, drain_timeout=drain_timeout, log_level="warning" if quiet else "info",
    )
    server = HylaServer(engine, settings, thread)

    async def main() -> None:
        await server.start()
        typer.echo(engine.capacity_report)
        typer.echo(banner(settings.model_name, host, server.http_port, server.grpc_port, api_key is not None))
        await server.wait_closed()

    asyncio.run(main())
    if server.failure is not None:
        typer.echo(f"error: the engine died: {server.failure!r}", err=True)
        raise typer.Exit(1)
