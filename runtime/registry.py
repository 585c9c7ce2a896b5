"""Registers the hybrid with transformers' Auto classes, so `AutoModelForCausalLM` loads converted dirs."""

from transformers import AutoConfig, AutoModelForCausalLM

from hyla.runtime.config import HybridConfig
from hyla.runtime.model import HybridForCausalLM

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
