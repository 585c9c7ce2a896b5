"""vLLM general plugin: serves hyla hybrids (`model_type: hyla_hybrid`) with `vllm serve DIR`.

vLLM imports this package in every one of its processes and calls `register()`. Registration is
lazy and idempotent: the model class (and vLLM's model code with it) is imported only when vLLM
builds a hyla model. Nothing else in hyla imports vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "HybridForCausalLM"
MODEL_CLASS = "hyla.vllm_plugin.model:HybridForCausalLM"


def register() -> None:
    """Teach transformers the `hyla_hybrid` config and vLLM the `HybridForCausalLM` architecture."""
    from vllm import ModelRegistry

    from hyla.runtime.registry import register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
