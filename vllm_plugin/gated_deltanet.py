"""hyla's Gated DeltaNet mixer as a vLLM state layer.

hyla's GDN is vLLM's Qwen-style Gated DeltaNet with flat `[q, k, v, z]` and `[b, a]` projections,
equal key and value heads, and hyla's extra biases. So the mixer is vLLM's layer (its kernels,
state shapes, tensor-parallel sharding and forward-context registration) with the projections
hyla's checkpoints need; `weights.py` maps hyla's names onto it.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention

from hyla.runtime.config import HybridConfig
from hyla.vllm_plugin.support import gdn_view


class GatedDeltaNet(QwenGatedDeltaNetAttention):
    """Gated delta rule with a SiLU short conv over q/k/v and a SiLU-gated RMSNorm on the output."""

    def __init__(self, config: HybridConfig, vllm_config: VllmConfig, prefix: str) -> None:
        self.qkv_bias = config.qkv_bias
        super().__init__(gdn_view(config), vllm_config, prefix=prefix)
        if config.o_bias:
            self.out_proj = RowParallelLinear(
                self.value_dim, self.hidden_size, bias=True, input_is_parallel=True,
                quant_config=self.quant_config, prefix=f"{prefix}.out_proj",
            )

    def create_qkvz_proj(self, hidden_size, key_dim, value_dim, quant_config, prefix) -> MergedColumnParallelLinear:
        """q, k, v and the output gate z in one column-parallel matmul; with hyla's q/k/v bias, z's
        share of the bias is zero (the checkpoint has none to load)."""
        proj = MergedColumnParallelLinear(
            hidden_size, [key_dim, key_dim, value_dim, value_dim], bias=self.qkv_bias,
            quant_config=quant_config, prefix=prefix,
        )
        if proj.bias is not None:
            proj.bias.data.zero_()
        return proj
