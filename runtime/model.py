"""`HybridForCausalLM`: a transformers `PreTrainedModel` whose layers are softmax or linear attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import DenseContext, ForwardContext
from hyla.runtime.hf_cache import HybridCache
from hyla.runtime.layers.decoder import DecoderLayer
from hyla.runtime.layers.linear_mixer import LinearMixer
from hyla.runtime.layers.norm import RMSNorm
from hyla.runtime.layers.rotary import RotaryEmbedding


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Linear layers carry states, not K/V: the model makes its own `HybridCache`.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LinearMixer):
            module.reset_linear_parameters()
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])


class HybridModel(HybridPreTrainedModel):
    """Embedding, decoder layers and final norm; runs under any `ForwardContext`."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None,
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,
        first_layer: int = 0,
    ) -> torch.Tensor:
        """Final hidden states `[B, T, hidden]` for the tokens of this pass.

        With `first_layer`, `inputs_embeds` is the residual stream entering that layer, and only the
        layers from there on run.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        ctx.rope = self.rotary_emb.cos_sin(ctx.position_ids, x.dtype)
        for layer in self.layers[first_layer:]:
            x = layer(x, ctx)
        return self.norm(x)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Causal LM head over `HybridModel`; HF-compatible `forward` and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        if use_cache and not isinstance(past_key_values, HybridCache):
            past_key_values = HybridCache()
        elif not isinstance(past_key_values, HybridCache):
            past_key_values = None
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = past_key_values.seq_len if past_key_values is not None else 0
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        ctx = DenseContext(position_ids.to(device), attention_mask, past_key_values)
        hidden = self.model(input_ids, ctx, inputs_embeds)
        if past_key_values is not None:
            past_key_values.seq_len += t
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: object,
    ) -> dict[str, object]:
        if isinstance(past_key_values, HybridCache) and past_key_values.seq_len > 0:
            input_ids = input_ids[:, past_key_values.seq_len :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
