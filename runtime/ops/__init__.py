"""Token-mixing ops for linear-attention layers.

``gated_delta_rule`` (Gated DeltaNet) and ``gated_linear_attention`` (GLA, per-key-dim gate) run
fla-core kernels on CUDA and a chunked / recurrent PyTorch reference elsewhere; ``short_conv`` is
the causal depthwise convolution with carried state. All accept packed varlen batches via
``cu_seqlens`` and carry recurrent state across calls.
"""

from .dispatch import gated_delta_rule, gated_linear_attention
from .short_conv import short_conv

__all__ = ["gated_delta_rule", "gated_linear_attention", "short_conv"]
