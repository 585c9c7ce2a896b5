"""Triton paged-attention and state-decode kernels against the PyTorch references on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.ops import paged_attention as pa
from hyla.runtime.ops.paged_attention import paged_decode_attention, paged_prefill_attention
from hyla.runtime.ops.state_decode import gdn_decode_, gla_decode_, short_conv_decode_
from tests.test_paged_ops import make_pool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_REL = 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def cuda_pool(lens: list[int], Hkv: int, block_size: int, dtype: torch.dtype, seed: int, head_dim: int, bound: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k, v, tables, _, _ = make_pool(lens, Hkv, block_size, dtype, gen, head_dim, -(-bound // block_size))
    return k.cuda(), v.cuda(), tables.cuda()


def decode_both(q, k, v, tables, ctx, block_size, max_context_len):
    got = paged_decode_attention(q, k, v, tables, ctx, 0.125, max_context_len=max_context_len, block_size=block_size)
    want = pa._decode_reference(q, k, v, tables, ctx, 0.125, max_context_len, block_size)
    return got, want


@pytest.mark.parametrize(
    "Hq,Hkv,Dh,block_size,dtype",
    [
        (32, 8, 64, 16, torch.bfloat16),
        (8, 8, 128, 128, torch.bfloat16),
        (16, 2, 128, 16, torch.float16),
    ],
)
def test_decode_matches_reference(Hq: int, Hkv: int, Dh: int, block_size: int, dtype: torch.dtype) -> None:
    lens = [1, 0, 256, 512, 1000, 37, 0, 2048]
    k, v, tables = cuda_pool(lens, Hkv, block_size, dtype, Hq + Dh, Dh, bound=4096)
    q = torch.randn(len(lens), Hq, Dh, device="cuda", dtype=dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    got, want = decode_both(q, k, v, tables, ctx, block_size, 4096)
    assert not got.isnan().any()
    assert (got[[1, 6]] == 0).all()
    assert rel(got, want) < MAX_REL


def test_decode_long_context_large_bound() -> None:
    lens = [16384, 7001, 1, 0, 300]
    k, v, tables = cuda_pool(lens, 8, 16, torch.bfloat16, 3, 64, bound=32768)
    assert tables.shape[1] * 16 == 32768
    q = torch.randn(len(lens), 32, 64, device="cuda", dtype=torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    got, want = decode_both(q, k, v, tables, ctx, 16, 32768)
    for n in (0, 1, 2, 4):
        assert rel(got[n], want[n]) < MAX_REL, n
    assert (got[3] == 0).all()


def test_decode_cuda_graph_replay_with_new_metadata() -> None:
    """Captured once with a fixed bound; replays see new queries, lengths and block tables."""
    Hq, Hkv, Dh, bs, N, bound = 32, 8, 64, 16, 6, 2048
    gen = torch.Generator().manual_seed(7)
    k, v, _ = cuda_pool([bound] * N, Hkv, bs, torch.bfloat16, 7, Dh)
    num_blocks = k.shape[0] // bs
    q = torch.zeros(N, Hq, Dh, device="cuda", dtype=torch.bfloat16)
    tables = torch.zeros(N, bound // bs, dtype=torch.int32, device="cuda")
    ctx = torch.zeros(N, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    workspace = torch.empty(pa.decode_workspace_numel(N, Hq, Hkv, Dh, bound), device="cuda")
    run = lambda: paged_decode_attention(  # noqa: E731
        q, k, v, tables, ctx, 0.125, out, max_context_len=bound, block_size=bs, workspace=workspace
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([1, 0, 2048, 17, 512, 300], [0, 0, 0, 0, 0, 1], [1999, 16, 256, 1, 0, 1024]):
        q.copy_(torch.randn(N, Hq, Dh, generator=gen).to(q))
        tables.copy_(torch.stack([torch.randperm(num_blocks, generator=gen)[: bound // bs] for _ in range(N)]).int())
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = pa._decode_reference(q, k, v, tables, ctx, 0.125, bound, bs)
        assert not out.isnan().any()
        for n, length in enumerate(lens):
            if length == 0:
                assert (out[n] == 0).all()
            else:
                assert rel(out[n], want[n]) < MAX_REL, (lens, n)


@pytest.mark.parametrize(
    "Hq,Hkv,Dh,block_size", [(32, 8, 64, 16), (8, 8, 128, 64)]
)
def test_prefill_matches_reference(Hq: int, Hkv: int, Dh: int, block_size: int) -> None:
    qlens = [1000, 300, 1, 64, 0, 129]
    ctxs = [1000, 1500, 50, 64, 20, 129]
    k, v, tables = cuda_pool(ctxs, Hkv, block_size, torch.bfloat16, Hq, Dh)
    q = torch.randn(sum(qlens), Hq, Dh, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ctx = torch.tensor(ctxs, dtype=torch.int32, device="cuda")
    got = paged_prefill_attention(q, k, v, tables, cu, ctx, 0.125, max(qlens), block_size=block_size)
    want = pa._prefill_reference(q, k, v, tables, cu, ctx, 0.125, block_size)
    assert not got.isnan().any()
    for n in range(len(qlens)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        if hi > lo:
            assert rel(got[lo:hi], want[lo:hi]) < MAX_REL, n


def state_inputs(op: str, N: int, H: int, K: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {"q": F.normalize(rand(N, H, K), dim=-1).bfloat16(), "k": F.normalize(rand(N, H, K), dim=-1).bfloat16()}
    x["v"] = rand(N, H, K).bfloat16()
    if op == "gdn":
        x["g"] = F.logsigmoid(rand(N, H))
        x["beta"] = rand(N, H).sigmoid()
    else:
        x["gk"] = F.logsigmoid(rand(N, H, K))
    return x


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("op", ["gdn", "gla"])
def test_recurrent_decode_matches_reference(op: str, K: int) -> None:
    N, H, slots = 5, 4, 9
    idx = torch.tensor([8, 0, 3, 5, 1])
    fn = gdn_decode_ if op == "gdn" else gla_decode_
    pool = torch.randn(slots, H, K, K)
    state_cpu, state_gpu = pool.clone(), pool.cuda()
    for step in range(2):
        x = state_inputs(op, N, H, K, step)
        want = fn(*x.values(), state_cpu, idx, K**-0.5)
        got = fn(*(t.cuda() for t in x.values()), state_gpu, idx.cuda(), K**-0.5)
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < MAX_REL
    torch.testing.assert_close(state_gpu.cpu(), state_cpu, atol=1e-4, rtol=1e-4)


def test_short_conv_decode_matches_reference() -> None:
    N, C, W, slots = 5, 3 * 4 * 64, 4, 9
    idx = torch.tensor([8, 0, 3, 5, 1])
    weight = torch.randn(C, W).bfloat16()
    pool = torch.randn(slots, C, W - 1).bfloat16()
    state_cpu, state_gpu = pool.clone(), pool.cuda()
    for step in range(3):
        x = torch.randn(N, C).bfloat16()
        want = short_conv_decode_(x, weight, state_cpu, idx)
        got = short_conv_decode_(x.cuda(), weight.cuda(), state_gpu, idx.cuda())
        assert rel(got, want) < MAX_REL
    torch.testing.assert_close(state_gpu.cpu(), state_cpu, atol=0, rtol=0)


def test_gdn_decode_cuda_graph() -> None:
    N, H, K, slots = 3, 4, 64, 6
    pool = torch.randn(slots, H, K, K, device="cuda")
    idx = torch.tensor([4, 1, 2], device="cuda")
    x = {name: t.cuda() for name, t in state_inputs("gdn", N, H, K, 0).items()}
    state = pool.clone()
    gdn_decode_(*x.values(), state, idx, 0.125)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gdn_decode_(*x.values(), state, idx, 0.125)
    state.copy_(pool)
    idx.copy_(torch.tensor([0, 5, 3]))
    graph.replay()
    ref_state = pool.cpu()
    want = gdn_decode_(*(t.cpu() for t in x.values()), ref_state, idx.cpu(), 0.125)
    assert rel(out, want) < MAX_REL
    torch.testing.assert_close(state.cpu(), ref_state, atol=1e-4, rtol=1e-4)
