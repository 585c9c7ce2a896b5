"""Registers the hybrid with transformers' Auto classes, so `AutoConfig` / `AutoModelForCausalLM` load
converted dirs. `hyla.hf_auto` calls each function once the Auto module it registers with has loaded."""

from __future__ import annotations


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from hyla.runtime.config import HybridConfig

    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from hyla.runtime.config import HybridConfig
    from hyla.runtime.model import HybridForCausalLM

    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
