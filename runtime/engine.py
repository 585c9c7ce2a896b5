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

from hyla.runtime.cache_budget import fmt_bytes, parse_memory, plan_cache
from hyla.runtime.cache_manager import CacheManager
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.errors import DuplicateRequestId, EngineDead, InvalidRequest
from hyla.runtime.info import cache_sizes
from hyla.runtime.loading import as_hybrid, load_hybrid, load_tokenizer, parse_dtype
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.model_runner import ChunkResult, ChunkWork, LaunchedStep, ModelRunner
from hyla.runtime.output_processor import OutputProcessor, new_detokenizer
from hyla.runtime.outputs import RequestOutput
from hyla.runtime.prefix_cache import PrefixCache, model_salt
from hyla.runtime.request import Request, Sequence
from hyla.runtime.sampling_params import SamplingParams
from hyla.runtime.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

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
    prefix_cache_queries_total: int = 0
    """Prompt tokens looked up in the prefix cache (each request once, when first admitted)."""
    prefix_cache_hits_total: int = 0
    """Of those, tokens found (not computed)."""
    prefix_cache_blocks: int = 0
    """KV blocks only the prefix cache holds (evictable; not in `kv_blocks_used`)."""
    prefix_cache_snapshots: int = 0
    """Linear-state snapshots the prefix cache holds (evictable; not in `state_slots_used`)."""


class LLMEngine:
    """Serves many requests of one model at once within one cache budget.

    The model is moved to `config.device` / `config.dtype` in place; a teacher is wrapped as its
    all-softmax hybrid (same weights). `tokenizer` may be None for token-id-only use. A step is
    schedule (the `Scheduler` and its `CacheManager`) → run (the `ModelRunner`, which also samples)
    → postprocess (the `OutputProcessor`).
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
            config.checkpoint_interval if config.enable_prefix_caching else None,
        )
        self.plan = plan
        self.max_model_len = plan.max_model_len
        self.max_num_seqs = plan.num_slots
        prefix = None
        if config.enable_prefix_caching:
            prefix = PrefixCache(model_salt(config.model, mc.layer_types, config.dtype, config.state_dtype))
        cache = CacheManager(
            plan.num_blocks, config.block_size, plan.num_slots, prefix_cache=prefix,
            has_state=bool(mc.linear_layers), checkpoint_interval=config.checkpoint_interval,
            num_snapshot_rows=plan.num_snapshot_rows,
        )
        self.scheduler = Scheduler(cache, plan.num_slots, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, plan, dtype, state_dtype, plan.num_slots, config.max_num_batched_tokens,
            use_cuda_graphs=not config.enforce_eager,
        )
        self.capacity_report = plan.report()
        if self.runner.graphs is not None:
            self.capacity_report += "\n" + self._graphs_report()
        if self.runner.warm_up_seconds:
            self.capacity_report += f"\neager prefill kernels warmed up in {self.runner.warm_up_seconds:.1f} s"
        logger.info("%s", self.capacity_report)
        self.outputs = OutputProcessor(self._eos_ids(), self.max_model_len)
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else device.type == "cuda"
        self._inflight: LaunchedStep | None = None
        self._state_copies: list[tuple[int, int]] = []
        """State-row copies (snapshots, forks) asked for while a step is postprocessed, made together."""
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._prompt_tokens = 0

    def _graphs_report(self) -> str:
        decode, chunks = self.runner.graphs, self.runner.chunk_graphs
        text = f"cuda graphs: decode batches {decode.buckets[0]}..{decode.buckets[-1]} ({len(decode.buckets)} sizes"
        memory, seconds = decode.memory_bytes, decode.seconds
        if chunks is not None:
            text += f"), chunks of up to {chunks.max_tokens} tokens ({len(chunks.keys)} shapes"
            memory += chunks.memory_bytes
            seconds += chunks.seconds
        return f"{text}; {fmt_bytes(memory)}, captured in {seconds:.1f} s)"

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model (as a hybrid) and its tokenizer, then start."""
        model = load_hybrid(config.model, parse_dtype(config.dtype), config.device)
        return cls(model, load_tokenizer(config.model), config)

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.outputs.eos_ids)

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
        """Validate and tokenise a request without touching engine state (raises `InvalidRequest`)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("request_id must be a non-empty string", "request_id")
        if request_id in self.requests:
            raise DuplicateRequestId(request_id)
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        needs_text = isinstance(prompt, str) or params.stop
        if needs_text and self.tokenizer is None:
            raise InvalidRequest("this engine has no tokenizer: give token ids and no stop strings", "prompt")
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequest("prompt is empty", "prompt")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
        if len(ids) > self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens, more than max_model_len {self.max_model_len}", "prompt"
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}; lower max_tokens to at most {self.max_model_len - len(ids)}",
                "max_tokens",
            )
        if params.n > self.max_num_seqs:
            raise InvalidRequest(f"n={params.n} exceeds the engine's max_num_seqs {self.max_num_seqs}", "n")
        seed = self._rng.getrandbits(64) if params.seed is None else params.seed
        request = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, next(self._order),
                          seed=seed)
        if params.prompt_logprobs is not None:  # entries up to the first position to score
            request.prompt_logprobs = [None] * min(max(params.prompt_logprobs_from, 1), len(ids))
        request.seqs.append(self._new_sequence(request, 0, list(ids)))
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        return Sequence(request, index, token_ids, new_detokenizer(self.tokenizer, request),
                        logprobs=[] if request.params.logprobs is not None else None,
                        seed=sequence_seed(request.seed, index))

    def enqueue(self, request: Request) -> None:
        """Add a request made by `make_request`."""
        if request.request_id in self.requests:
            raise DuplicateRequestId(request.request_id)
        self.requests[request.request_id] = request
        self.scheduler.add(request.seqs[0])

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a prompt; raises `InvalidRequest` on bad input and then leaves nothing behind."""
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
        """Schedule, run, postprocess; outputs for the requests that advanced (finished ones once).

        With async scheduling (on CUDA by default) a decode step is scheduled and queued before the
        previous one's tokens reach the host, and the previous one is postprocessed while it runs:
        outputs then trail the device by one step. A failure while running fails only the requests
        of that step (their cache freed, their output carries `error`); one that leaves the device
        unusable raises `EngineDead`.
        """
        outputs = []
        if self._inflight is not None and not self._can_overlap(self._inflight):
            outputs += self._settle()
        plan = self.scheduler.schedule()
        launched = self._launch(plan, outputs) if plan.chunks else None
        outputs += self._settle()
        self._inflight = launched
        if not (self.async_scheduling and self.requests):  # nobody waits for a next step
            outputs += self._settle()
        return outputs

    def _settle(self) -> list[RequestOutput]:
        """Finish the queued step, if any."""
        launched, self._inflight = self._inflight, None
        return self._finish(launched) if launched is not None else []

    def _launch(self, plan: SchedulerOutput, outputs: list[RequestOutput]) -> LaunchedStep | None:
        """Queue a scheduled step on the device and account for what it computes and draws (the drawn
        tokens are pending until `_finish`); a failure's outputs go to `outputs`."""
        work = [self._work(c) for c in plan.chunks]
        try:
            launched = self.runner.execute(work, plan.block_copies, plan.state_copies)
        except Exception as exc:
            outputs += self._fail({c.seq.request.request_id: c.seq.request for c in plan.chunks}.values(), exc)
            return None
        for w in work:
            seq, params = w.chunk.seq, w.chunk.seq.request.params
            seq.num_computed += w.chunk.num_tokens
            if w.draws:
                seq.pending += 1
                seq.final_pending = (len(seq.output_ids) + seq.pending >= params.max_tokens
                                     or seq.num_tokens >= self.max_model_len)
        return launched

    def _can_overlap(self, launched: LaunchedStep) -> bool:
        """Whether the next step may be scheduled before `launched` is postprocessed: only after a pure
        decode step (prefill steps hand out prompt log-probabilities, forks and prefix snapshots,
        which need the step's results first)."""
        return all(w.chunk.start >= w.chunk.seq.request.num_prompt_tokens for w in launched.work)

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and apply them."""
        try:
            results = launched.results()
        except Exception as exc:
            requests = {w.chunk.seq.request.request_id: w.chunk.seq.request for w in launched.work}
            return self._fail([r for r in requests.values() if not r.finished], exc)
        advanced: dict[str, Request] = {}
        failed: list[tuple[Request, Exception]] = []
        for w, result in zip(launched.work, results):
            request = w.chunk.seq.request
            try:
                if self._postprocess(w, result):
                    advanced[request.request_id] = request
            except Exception as exc:
                failed.append((request, exc))
        self.runner.copy_states(self._state_copies)
        self._state_copies = []
        outputs = [self.outputs.output(r) for r in advanced.values() if r.error is None]
        for request, exc in failed:
            outputs += self._fail([request], exc)
        for request in advanced.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _work(self, chunk: ScheduledChunk) -> ChunkWork:
        """Log-prob rows and draws one chunk needs: prompt log-probabilities still missing, and once
        every known token is computed, the next token (n of them when the request forks now)."""
        seq, request = chunk.seq, chunk.seq.request
        params = request.params
        rows = []
        if request.prompt_logprobs is not None:
            first = max(chunk.start, len(request.prompt_logprobs) - 1)
            rows = list(range(first - chunk.start, min(chunk.end, request.num_prompt_tokens - 1) - chunk.start))
        draws = []
        if chunk.completes and params.max_tokens > 0:
            family = range(params.n) if request.needs_fork else [seq.index]
            draws = [(params, sequence_seed(request.seed, i)) for i in family]
        return ChunkWork(chunk, rows, draws, score_last=bool(draws) and params.logprobs is not None)

    def _postprocess(self, work: ChunkWork, result: ChunkResult) -> bool:
        """Apply one chunk's results; True if its request advanced."""
        chunk, seq = work.chunk, work.chunk.seq
        request, params = seq.request, seq.request.params
        if work.draws:
            seq.pending -= 1
        if seq.finished:  # aborted, or it finished while this step was already queued
            self._retire(seq)
            return False
        if seq.slot is not None:
            self._keep(seq)
        if result.prompt_logprobs:
            self.outputs.prompt_logprobs(request, chunk.start, work.prompt_rows, result.prompt_logprobs)
        if not chunk.completes:
            return False
        if chunk.end == request.num_prompt_tokens and seq.index == 0 and not request.forked:
            self._prompt_tokens += request.num_prompt_tokens
        if params.max_tokens == 0:
            self.outputs.finish(seq, "length")
            self.scheduler.remove(seq)
            return True
        family = [seq] + (self._fork(seq) if request.needs_fork else [])
        entries = result.logprobs or [None] * len(family)
        for member, token, entry in zip(family, result.tokens, entries):
            if self.outputs.append(member, token, entry):
                self._retire(member)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        return True

    def _retire(self, seq: Sequence) -> None:
        """A finished or aborted sequence: offer it to the prefix cache and free its cache, or, when a
        queued step still runs it, leave that to the step's postprocessing."""
        if seq.pending:
            if seq in self.scheduler.running:
                self.scheduler.park(seq)
            return
        if seq.slot is not None:
            self._keep(seq, finished=True)
        self.scheduler.remove(seq)

    def _keep(self, seq: Sequence, finished: bool = False) -> None:
        """Offer what `seq` computed to the prefix cache; its states are copied into snapshots once the
        step is postprocessed (before any slot is reused)."""
        self._state_copies += self.scheduler.cache.computed(seq, finished)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Siblings 1..n-1 of a sequence whose prompt is done: shared blocks, copied states."""
        request = parent.request
        children = []
        for index in range(1, request.params.n):
            child = self._new_sequence(request, index, list(parent.token_ids))
            child.num_computed = parent.num_computed
            self.scheduler.fork(parent, child)
            self._state_copies.append((parent.slot, child.slot))
            request.seqs.append(child)
            children.append(child)
        request.forked = True
        return children

    def _fail(self, requests, exc: Exception) -> list[RequestOutput]:
        """Finish `requests` with an error and free their cache; re-raise as `EngineDead` if the device
        is no longer usable."""
        logger.error("engine step failed for %d request(s)", len(requests), exc_info=exc)
        outputs = []
        for request in requests:
            request.error = f"{type(exc).__name__}: {exc}"
            self.abort_request(request.request_id)
            outputs.append(self.outputs.output(request))
        if is_fatal(exc):
            raise EngineDead(f"the engine cannot carry on: {exc}") from exc
        return outputs

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
            raise InvalidRequest(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        requests = [self.make_request(f"generate-{next(self._ids)}", p, sp) for p, sp in zip(prompts, plist)]
        ids = {r.request_id for r in requests}
        if len(ids) < len(requests) or ids & set(self.requests):
            raise InvalidRequest("generated request ids collide with running requests")
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

    def load(self) -> tuple[int, int]:
        """Running and waiting sequences: two list lengths, safe to read from another thread."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        running = {s.request.request_id for s in self.scheduler.running}
        waiting = {s.request.request_id for s in self.scheduler.waiting} - running
        cache = self.scheduler.cache
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_blocks_used=cache.num_used_blocks,
            kv_blocks_total=cache.blocks.num_blocks,
            state_slots_used=cache.num_used_slots,
            state_slots_total=cache.num_slots,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self.outputs.generation_tokens,
            prefix_cache_queries_total=cache.queried_tokens,
            prefix_cache_hits_total=cache.hit_tokens,
            prefix_cache_blocks=cache.num_cached_blocks,
            prefix_cache_snapshots=cache.num_snapshots,
        )


def sequence_seed(request_seed: int, index: int) -> int:
    """The signed 64-bit seed of continuation `index` of a request seeded with any integer."""
    mixed = (request_seed + 0x9E3779B97F4A7C15 * index) % (1 << 64)
    return mixed - (1 << 64) if mixed >= 1 << 63 else mixed


FATAL_ERRORS = tuple(t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)
"""Errors after which the device (and so the engine) cannot be trusted: CUDA faults."""


def is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, FATAL_ERRORS)
