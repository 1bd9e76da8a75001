"""troupe's subclasses of mlx-lm's continuous batching classes (mlx_lm/generate.py).

``RowsGeneration`` and ``RowsPrompt`` are mlx-lm's generation and prompt batches, which
move rows in and out of ``_batch_cache.BatchKV`` buffers without copying the batch (that
module says how); ``EagerGenerator`` is mlx-lm's generator with eager steps.

Importing this module imports mlx-lm (seconds): troupe imports it when it first needs it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from ._batch_cache import BatchKV


class RowsGeneration(GenerationBatch):  # type: ignore[misc]
    """mlx-lm's generation batch, whose rows leave by being filled from the end and
    whose KV buffer keeps free rows for rows that join (up to ``reserve_rows``)."""

    reserve_rows = 0
    kept_from: dict[int, int]
    """Per uid, the first token of a finished row's KV its caller keeps."""
    eager = False
    """A step returns the tokens it samples, not (as mlx-lm's) the ones it feeds."""
    _deferred = False

    @classmethod
    def joining(cls, prompted: Any, last: list[int]) -> Any:
        """Rows that finished their prompt but its last token, which they feed in the
        running batch's next step (mlx-lm steps them once on their own first)."""
        batch = cls.__new__(cls)
        batch._deferred = True
        GenerationBatch.__init__(
            batch, prompted.model, prompted.uids, mx.array(last), prompted.prompt_cache,
            prompted.tokens, prompted.samplers, prompted.fallback_sampler,
            prompted.logits_processors, prompted.stop_sequences, prompted.max_tokens)
        batch._deferred = False
        # One entry per row, as mlx-lm's filter expects, until their first step.
        batch._next_logprobs = [mx.array(0.0)] * len(batch.uids)
        return batch

    def _step(self) -> Any:
        if self._deferred:
            return [], []
        fed, logprobs = super()._step()
        if not self.eager:
            return fed, logprobs
        # mlx-lm has begun evaluating the tokens it sampled (the rows' next input) and
        # returns the ones it fed, a step late. On the CPU its async_eval waits for
        # nearly all of the forward pass anyway (MLX bounds the tasks in flight), so
        # the pipelining only delays each token by a step: return the sampled ones.
        mx.eval(self._next_tokens, self._next_logprobs)
        return self._next_tokens.tolist(), self._next_logprobs

    def extend(self, batch: Any) -> None:
        for cache in (*self.prompt_cache, *batch.prompt_cache):
            if isinstance(cache, BatchKV):
                cache.reserve_rows = self.reserve_rows
        super().extend(batch)

    def extract_cache(self, idx: int) -> list[Any]:
        # Only the tokens the caller does not hold as blocks yet are copied out.
        first = self.kept_from.get(self.uids[idx], 0)
        return [c.extract(idx, first) if isinstance(c, BatchKV) else c.extract(idx)
                for c in self.prompt_cache]

    def filter(self, keep: list[int]) -> None:
        # Rows are told apart by uid, so their order is free: each row that leaves is
        # replaced by one from the end, and only those rows move in the cache.
        count, kept = len(keep), set(keep)
        for i, uid in enumerate(self.uids):
            if i not in kept:
                self.kept_from.pop(uid, None)
        movers = iter(i for i in keep if i >= count)
        super().filter([i if i in kept else next(movers) for i in range(count)])

class RowsPrompt(PromptProcessingBatch):  # type: ignore[misc]
    """mlx-lm's prompt batch, whose rows that finish their prompt leave as a copy of
    just those rows, or with its buffer if all leave (mlx-lm deep-copied the whole
    batch, then filtered both copies)."""

    prompt_cache: list[Any]

    def split(self, indices: list[int]) -> Any:
        if not all(isinstance(c, BatchKV) and c.keys is not None
                   for c in self.prompt_cache):
            return super().split(indices)
        indices = sorted(indices)
        everyone = len(indices) == len(self.uids)
        # When every row leaves, its buffer goes with them, uncopied.
        caches = (self.prompt_cache if everyone
                  else [c.take(indices) for c in self.prompt_cache])
        leaving = copy.copy(self)
        leaving.prompt_cache = []  # so filter only picks the per-row lists
        leaving.filter(indices)
        leaving.prompt_cache = caches
        if everyone:
            self.prompt_cache = []
        self.filter(sorted(set(range(len(self.uids))) - set(indices)))
        return leaving

class EagerGenerator(BatchGenerator):  # type: ignore[misc]
    """mlx-lm's generator with eager steps (``RowsGeneration.eager``): rows that
    finished their prompt join the running batch before its step and feed their last
    prompt token in it, so their first token comes out of that step (mlx-lm stepped
    them on their own, and their first token came out of the step after)."""

    _currently_processing: list[Any]
    """mlx-lm's: per prompt-batch row, [segments left, tokens done, tokens in all]."""

    def _join_prompted(self) -> list[Any]:
        split = [i for i, (segments, _, _) in enumerate(self._currently_processing)
                 if len(segments) == 1 and len(segments[0]) == 1]
        if not split:
            return []
        last = [self._currently_processing[i][0][0][0] for i in split]
        totals = [self._currently_processing[i][2] for i in split]
        leaving = set(split)
        self._currently_processing = [p for i, p in enumerate(self._currently_processing)
                                      if i not in leaving]
        joining = RowsGeneration.joining(self._prompt_batch.split(split), last)
        self._generation_batch.extend(joining)
        return [PromptProcessingBatch.Response(uid, (total, total), True, True)
                for uid, total in zip(joining.uids, totals, strict=True)]

    def _next(self) -> Any:
        # mlx-lm's _next, with the prompt batch's finished rows joining first.
        prompt_responses = self._join_prompted()
        generation_responses = []
        counters = self._counters
        if len(self._generation_batch) > 0:
            tic = time.perf_counter()
            generation_responses = self._generation_batch.next()
            counters.decode_time += time.perf_counter() - tic
            counters.generation_tokens += len(generation_responses)
            counters.generation_steps += 1
            if counters.generation_steps % 512 == 0:
                mx.clear_cache()
        if len(self._generation_batch) >= self.completion_batch_size:
            return prompt_responses, generation_responses
        n = min(self.prefill_batch_size - len(self._prompt_batch),
                self.completion_batch_size - len(self._generation_batch),
                len(self._unprocessed_sequences))
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))
        # Rows queued with a one-token prompt: they step with the batch next time.
        prompt_responses += self._join_prompted()
        prompts = []
        for i, progress in enumerate(self._currently_processing):
            response = PromptProcessingBatch.Response(
                self._prompt_batch.uids[i], 0, False, False)
            segments = progress[0]
            chunk = segments[0][: self.prefill_step_size]
            segments[0] = segments[0][len(chunk):]
            if not segments[0]:
                segments.pop(0)
                response.end_of_segment = True
            prompts.append(chunk)
            progress[1] += len(chunk)
            response.progress = (progress[1], progress[2])
            prompt_responses.append(response)
        counters.prompt_tokens += sum(len(p) for p in prompts)
        tic = time.perf_counter()
        self._prompt_batch.prompt(prompts)
        counters.prompt_time += time.perf_counter() - tic
        return prompt_responses, generation_responses
