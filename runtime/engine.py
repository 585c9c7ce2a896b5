"""`LLMEngine`: continuous-batching generation over a paged KV cache and linear-state slots.

Add requests, call `step()` until no work is left, read the outputs it returns; or call
`generate()` for offline batches. The model is the ordinary `HybridForCausalLM` (a teacher runs as
its all-softmax hybrid); only the execution context differs from HF `generate`.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hyla.runtime.block_manager import BlockManager
from hyla.runtime.cache_budget import parse_memory, plan_cache
from hyla.runtime.detokenizer import IncrementalDetokenizer
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.info import cache_sizes
from hyla.runtime.kv_cache import PagedKVCache
from hyla.runtime.loading import as_hybrid, load_hybrid, load_tokenizer, parse_dtype
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.model_runner import ModelRunner
from hyla.runtime.outputs import CompletionOutput, RequestOutput
from hyla.runtime.paged_context import SeqChunk
from hyla.runtime.request import Request, Sequence
from hyla.runtime.sampler import sample, token_logprobs
from hyla.runtime.sampling_params import SamplingParams
from hyla.runtime.scheduler import ScheduledChunk, Scheduler
from hyla.runtime.state_pool import StatePool

logger = logging.getLogger(__name__)
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineStats:
    """Counters for metrics: requests, cache usage and token totals."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    state_slots_used: int
    state_slots_total: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int


class LLMEngine:
    """Serves many requests of one model at once within one cache budget.

    The model is moved to `config.device` / `config.dtype` in place; a teacher is wrapped as its
    all-softmax hybrid (same weights). `tokenizer` may be None for token-id-only use.
    """

    def __init__(
        self, model: HybridForCausalLM, tokenizer: PreTrainedTokenizerBase | None, config: EngineConfig
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        dtype, state_dtype = parse_dtype(config.dtype), parse_dtype(config.state_dtype)
        device = torch.device(config.device)
        self.model = as_hybrid(model).to(device=device, dtype=dtype).eval()
        mc = self.model.config
        wanted_len = config.max_model_len or min(mc.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        plan = plan_cache(
            cache_sizes(mc, kv_dtype=dtype, state_dtype=state_dtype),
            parse_memory(config.cache_memory, config.device),
            config.block_size, config.max_num_seqs, wanted_len,
        )
        self.plan = plan
        self.max_model_len = plan.max_model_len
        self.max_num_seqs = plan.num_slots
        self.capacity_report = plan.report()
        logger.info("%s", self.capacity_report)
        self.kv = PagedKVCache(mc, plan.num_blocks, config.block_size, dtype, device)
        self.states = StatePool(mc, plan.num_slots, dtype, state_dtype, device)
        self.blocks = BlockManager(plan.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, self.states, plan.num_slots, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv, self.states)
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._eos = self._eos_ids()
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model (as a hybrid) and its tokenizer, then start."""
        model = load_hybrid(config.model, parse_dtype(config.dtype), config.device)
        return cls(model, load_tokenizer(config.model), config)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        sources = [self.model.config.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)]
        if self.tokenizer is not None:
            sources.append(self.tokenizer.eos_token_id)
        for source in sources:
            ids.update([source] if isinstance(source, int) else source or [])
        return ids

    # ---- requests -------------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        """Validate and tokenise a request without touching engine state (raises `ValueError`)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        needs_text = isinstance(prompt, str) or params.stop
        if needs_text and self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: give token ids and no stop strings")
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_model_len {self.max_model_len}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}; lower max_tokens to at most {self.max_model_len - len(ids)}"
            )
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds the engine's max_num_seqs {self.max_num_seqs}")
        request = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, next(self._order))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        request.seqs.append(self._new_sequence(request, 0, list(ids)))
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens, params.stop
            )
        generator = None
        if not params.greedy:
            seed = self._rng.randrange(2**62) if params.seed is None else params.seed + 1_000_003 * index
            generator = torch.Generator(self.runner.device).manual_seed(seed)
        return Sequence(request, index, token_ids, detok, generator,
                        logprobs=[] if params.logprobs is not None else None)

    def enqueue(self, request: Request) -> None:
        """Add a request made by `make_request`."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request.seqs[0])

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a prompt; raises `ValueError` on bad input and then leaves nothing behind."""
        self.enqueue(self.make_request(request_id, prompt, params))

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its cache; an unknown id is ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            self.scheduler.remove(seq)
            seq.finish_reason = seq.finish_reason or "abort"
        request.finished_time = time.monotonic()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs for the requests that advanced (finished ones once)."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        rows = [self._logit_rows(c) for c in plan.chunks]
        logits = self.runner.execute(
            [SeqChunk(c.start, c.num_tokens, c.seq.block_table, c.seq.slot) for c in plan.chunks],
            [c.seq.token_ids[c.start : c.start + c.num_tokens] for c in plan.chunks],
            rows,
            plan.block_copies,
        )
        advanced: dict[str, Request] = {}
        for chunk, chunk_rows, chunk_logits in zip(plan.chunks, rows, logits):
            request = chunk.seq.request
            chunk.seq.num_computed += chunk.num_tokens
            if self._process(chunk, chunk_rows, chunk_logits):
                advanced[request.request_id] = request
        outputs = [self._output(r) for r in advanced.values()]
        for request in advanced.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _logit_rows(self, chunk: ScheduledChunk) -> list[int]:
        """Chunk-relative positions whose logits are needed: prompt logprobs still missing, and the
        last position once every known token is computed (it predicts the next token)."""
        seq, request = chunk.seq, chunk.seq.request
        end = chunk.start + chunk.num_tokens
        rows = []
        if request.prompt_logprobs is not None:
            first = max(chunk.start, len(request.prompt_logprobs) - 1)
            rows = list(range(first - chunk.start, min(end, request.num_prompt_tokens - 1) - chunk.start))
        if end == seq.num_tokens:
            rows.append(chunk.num_tokens - 1)
        return rows

    def _process(self, chunk: ScheduledChunk, rows: list[int], logits: torch.Tensor) -> bool:
        """Use a chunk's logits: prompt logprobs, then the next token. True if the request advanced."""
        seq, request = chunk.seq, chunk.seq.request
        params = request.params
        logprobs = logits.log_softmax(-1) if rows and (params.logprobs is not None or request.prompt_logprobs) else None
        if request.prompt_logprobs is not None:
            for r, pos in enumerate(chunk.start + x for x in rows):
                if pos + 1 < request.num_prompt_tokens and pos + 1 == len(request.prompt_logprobs):
                    token = request.prompt_token_ids[pos + 1]
                    request.prompt_logprobs.append(token_logprobs(logprobs[r], token, params.prompt_logprobs))
        if seq.num_computed < seq.num_tokens:
            return False
        if seq.num_computed == request.num_prompt_tokens and seq.index == 0 and not request.forked:
            self._prompt_tokens += request.num_prompt_tokens
        if params.max_tokens == 0:
            self._finish(seq, "length")
            request.finished_time = time.monotonic()
            return True
        family = [seq]
        if request.needs_fork:
            family += self._fork(seq)
        tokens = sample(logits[-1:].expand(len(family), -1), [params] * len(family), [s.generator for s in family])
        for s, token in zip(family, tokens):
            self._append(s, token, None if logprobs is None else logprobs[-1])
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        if all(s.finished for s in request.seqs):
            request.finished_time = time.monotonic()
        return True

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Siblings 1..n-1 of a sequence whose prompt is done: shared blocks, copied states."""
        request = parent.request
        children = []
        for index in range(1, request.params.n):
            child = self._new_sequence(request, index, list(parent.token_ids))
            child.num_computed = parent.num_computed
            child.block_table = self.blocks.fork(parent.block_table)
            child.slot = parent.spare_slots.pop()
            self.states.copy(parent.slot, child.slot)
            request.seqs.append(child)
            self.scheduler.add_running(child)
            children.append(child)
        request.forked = True
        return children

    def _append(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        self._generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(token_logprobs(logprobs, token, params.logprobs))
        if token in params.stop_token_ids:
            return self._finish(seq, "stop", token)
        if token in self._eos and not params.ignore_eos:
            return self._finish(seq, "stop")
        if seq.detokenizer is not None:
            stop = seq.detokenizer.add(token)
            if stop is not None:
                return self._finish(seq, "stop", stop)
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.flush()
        self.scheduler.remove(seq)

    def _output(self, request: Request) -> RequestOutput:
        completions = [self._completion(seq) for seq in request.seqs]
        completions += [  # n > 1 with max_tokens 0: siblings were never forked
            CompletionOutput(index=i, logprobs=completions[0].logprobs, finish_reason=completions[0].finish_reason)
            for i in range(len(completions), request.params.n)
        ]
        metrics = {"arrival": request.arrival}
        if request.first_token_time is not None:
            metrics["first_token"] = request.first_token_time
        if request.finished_time is not None:
            metrics["finished"] = request.finished_time
        done = request.prompt_logprobs is not None and len(request.prompt_logprobs) == request.num_prompt_tokens
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=completions,
            prompt_logprobs=list(request.prompt_logprobs) if done else None,
            finished=request.finished,
            metrics=metrics,
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        ids = seq.output_ids
        text = seq.detokenizer.visible(seq.finished) if seq.detokenizer is not None else ""
        out = CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=list(ids),
            text_delta=text[seq.sent_text :],
            token_ids_delta=ids[seq.sent_tokens :],
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        seq.sent_tokens, seq.sent_text = len(ids), len(text)
        return out

    # ---- offline --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run prompts to completion; final outputs in input order. Nothing is queued if any is invalid.

        Steps the engine until these requests finish; outputs of other requests added meanwhile are
        not returned (use `step()` to serve several callers).
        """
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        requests = [self.make_request(f"generate-{next(self._ids)}", p, sp) for p, sp in zip(prompts, plist)]
        ids = {r.request_id for r in requests}
        if len(ids) < len(requests) or ids & set(self.requests):
            raise ValueError("generated request ids collide with running requests")
        for request in requests:
            self.enqueue(request)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(requests), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while len(final) < len(requests):
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[r.request_id] for r in requests]

    def stats(self) -> EngineStats:
        running = {s.request.request_id for s in self.scheduler.running}
        waiting = {s.request.request_id for s in self.scheduler.waiting} - running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            state_slots_used=self.states.num_used,
            state_slots_total=self.states.num_slots,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
        )
