"""The compiled (fused) elementwise layer pieces against their plain PyTorch form on the GPU."""

from __future__ import annotations

import pytest
import torch

from hyla.runtime.layers.fusion import fuse_always
from hyla.runtime.layers.gated_deltanet import gdn_gates, l2_normalize
from hyla.runtime.layers.linear_mixer import gated_rms_norm
from hyla.runtime.layers.mlp import silu_mul
from hyla.runtime.layers.norm import rms_norm
from hyla.runtime.layers.rotary import apply_rotary

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cases(dtype: torch.dtype, rows: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, device="cuda", generator=g).to(dt)  # noqa: E731
    return {
        rms_norm: (r(rows, 576), r(576), 1e-5),
        apply_rotary: (r(1, rows, 9, 64), r(1, rows, 64), r(1, rows, 64)),
        silu_mul: (r(rows, 1536), r(rows, 1536)),
        l2_normalize: (r(1, rows, 9, 64),),
        gdn_gates: (r(1, rows, 9), r(1, rows, 9), r(9, dt=torch.float32), r(9, dt=torch.float32)),
        gated_rms_norm: (r(1, rows, 9, 64), r(64), 1e-6, r(1, rows, 9, 64)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_plain_cuda(dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode(), fuse_always():
        for rows, seed in ((1, 0), (37, 1), (256, 2)):  # one compile serves every row count
            for fn, args in cases(dtype, rows, seed).items():
                got, want = fn(*args), fn.plain(*args)
                for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
                    assert a.dtype == b.dtype and a.shape == b.shape
                    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                    assert err < tol, (fn.__name__, rows, err)
