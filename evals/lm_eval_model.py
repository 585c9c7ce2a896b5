"""The lm-eval model type `hyla`: our serving engine, in-process, behind lm-eval's `LM` interface.

    python -m hyla.evals run --model hyla --model_args pretrained=runs/smollm2-hybrid --tasks hellaswag

The device is `device=` in the model args, else lm-eval's `--device`; a CUDA device on a machine
without CUDA (lm-eval's default is `cuda:0`) runs on the CPU instead.

Scoring uses the engine's prompt log-probabilities (`max_tokens=0`), so every request of a task
is one engine batch. Tokenisation, truncation and the empty-context prefix follow lm-eval's API
models (`local-completions`), so in-process and over-HTTP numbers agree.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

import lm_eval.models  # noqa: F401  (built-in model types first: lm-eval skips its lazy import once any is registered)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams

Request = tuple[tuple[str, str] | None, list[int], list[int]]
log = logging.getLogger(__name__)


@register_model("hyla")
class HylaLM(TemplateLM):
    """lm-eval `LM` backed by `LLMEngine`; model args are `pretrained=` plus any `EngineConfig` field."""

    def __init__(
        self,
        pretrained: str | None = None,
        engine: LLMEngine | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
        device: str | None = None,
        **engine_args: Any,
    ) -> None:
        super().__init__()
        if engine is None:
            if pretrained is None:
                raise ValueError("the hyla model needs `pretrained=<model dir, hub id or alias>`")
            engine_args["device"] = _available(device)
            engine = LLMEngine.from_config(_engine_config(pretrained, batch_size, engine_args))
        elif engine_args:
            raise ValueError(f"engine arguments {sorted(engine_args)} given together with a built engine")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self.model_name = pretrained or getattr(engine.config, "model", "hyla")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> HylaLM:
        """lm-eval's own settings (`--device`, batch sizes) fill in only what the model args leave out."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> HylaLM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def max_length(self) -> int:
        return self.engine.max_model_len

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "hyla")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens or self.add_bos_token
        return self.tokenizer(string, add_special_tokens=special, return_attention_mask=False).input_ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any):
        """Sum of continuation log-probs and whether every continuation token was the argmax."""
        prompts, ctxlens = [], []
        for _, context, continuation in requests:
            whole = context + continuation
            overflow = max(0, len(whole) - self.max_length)
            prompts.append(whole[overflow:])
            ctxlens.append(len(context) - overflow)
        params = [SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0, prompt_logprobs_from=n)
                  for n in ctxlens]  # only continuations are scored: a cached context is reused
        outputs = self.engine.generate(prompts, params, use_tqdm=not disable_tqdm)
        results = []
        for (key, _, _), prompt, ctxlen, out in zip(requests, prompts, ctxlens, outputs):
            total, greedy = 0.0, True
            for pos in range(ctxlen, len(prompt)):
                logprob, rank = out.prompt_logprobs[pos][prompt[pos]]
                total += logprob
                greedy = greedy and rank == 1
            results.append((total, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of at most `max_length` tokens."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            rolling = lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if `do_sample`) continuations, cut at the `until` strings."""
        prompts, params = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", self.max_gen_toks)))
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 1.0)) if do_sample else 0.0
            ids = self.tok_encode(context)
            budget = max(1, self.max_length - max_tokens)
            prompts.append(ids[-budget:])
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=float(kwargs.pop("top_p", 1.0)),
                    top_k=int(kwargs.pop("top_k", 0)),
                    stop=[s for s in until if s],
                )
            )
        outputs = self.engine.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = [out.outputs[0].text for out in outputs]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts


def _engine_config(pretrained: str, batch_size: int | str | None, engine_args: dict[str, Any]) -> EngineConfig:
    """`EngineConfig` from lm-eval model args (strings from the CLI are cast to the field types)."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(engine_args) - set(fields))
    if unknown:
        raise ValueError(f"unknown hyla model argument(s) {unknown}; EngineConfig fields are {sorted(fields)}")
    kwargs: dict[str, Any] = {"model": pretrained}
    if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
        kwargs["max_num_seqs"] = int(batch_size)
    for name, value in engine_args.items():
        if value is None:
            continue
        default = fields[name].default
        if isinstance(value, str) and isinstance(default, bool):
            value = _as_bool(value)
        elif isinstance(value, str) and isinstance(default, int):
            value = int(value)
        elif isinstance(value, str) and name == "max_model_len":
            value = int(value)
        kwargs[name] = value
    return EngineConfig(**kwargs)


def _available(device: str | None) -> str:
    """`device`, or the CPU where it names CUDA (or nothing) and CUDA is not available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA is not available; the hyla model runs on the CPU instead of %s", device)
        return "cpu"
    return device


def _as_bool(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")

