"""troupe's subclasses of mlx-lm's continuous batching classes (mlx_lm/generate.py).

``RowsGenerator`` is mlx-lm's ``BatchGenerator`` whose prompt batch and generation batch
are troupe's (``RowsPrompt``, ``RowsGeneration``): they move rows in and out of
``_batch_cache.BatchKV`` buffers without copying the batch (that module says how).
``EagerGenerator`` adds eager steps: a step returns the tokens it samples.

Importing this module imports mlx-lm (seconds): troupe imports it when it first needs it.
The mlx-lm private names each class uses are in one block of that class, which names where
in mlx-lm they come from; ``_version.MLX_LM_SUPPORTED`` is the range they were read from.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

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

    # mlx-lm's private names, used only in this block (mlx_lm/generate.py, class
    # GenerationBatch): ``_step``, one forward pass that feeds each row a token and samples
    # the next (its __init__ runs one); ``_next_tokens`` and ``_next_logprobs``, what it
    # sampled, set at its end and fed by the next ``_step``.

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

    def _no_samples_yet(self) -> None:
        # One entry per row, as mlx-lm's filter expects, until their first step.
        self._next_logprobs = [mx.array(0.0)] * len(self.uids)

    # troupe's own code from here on.

    @classmethod
    def started(cls, model: Any, sampler: Any, *, reserve_rows: int,
                eager: bool) -> RowsGeneration:
        """The generator's generation batch, empty (made once, as mlx-lm makes its own)."""
        batch: RowsGeneration = cls.empty(model, sampler)
        batch.reserve_rows = reserve_rows
        batch.kept_from = {}
        batch.eager = eager
        return batch

    @classmethod
    def joining(cls, prompted: Any, last: list[int]) -> RowsGeneration:
        """Rows that finished their prompt but its last token, which they feed in the
        running batch's next step (mlx-lm steps them once on their own first)."""
        batch = cls.__new__(cls)
        batch._deferred = True
        GenerationBatch.__init__(
            batch, prompted.model, prompted.uids, mx.array(last), prompted.prompt_cache,
            prompted.tokens, prompted.samplers, prompted.fallback_sampler,
            prompted.logits_processors, prompted.stop_sequences, prompted.max_tokens)
        batch._deferred = False
        batch._no_samples_yet()
        return batch

    def row_views(self, uid: int) -> tuple[list[Any], list[int]] | None:
        """Row ``uid``'s cache as views into the batch's buffer (``BatchKV.row_view``) and
        its tokens; None if it is not in this batch or its cache is not troupe's."""
        if uid in self.uids and all(isinstance(c, BatchKV) for c in self.prompt_cache):
            idx = self.uids.index(uid)
            return ([c.row_view(idx) for c in self.prompt_cache], list(self.tokens[idx]))
        return None

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
    batch, then filtered both copies). It uses no private name of mlx-lm's."""

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


class EagerPrompt(RowsPrompt):
    """The prompt batch of eager steps: its rows that finished their prompt but the last
    token join the running batch as ``RowsGeneration.joining`` rows, unstepped (mlx-lm's
    ``generate`` stepped them once on their own). It uses no private name of mlx-lm's."""

    def generate(self, tokens: list[list[int]]) -> RowsGeneration:
        # As mlx-lm's generate: each row's tokens but the last are prompt (none, as
        # BatchGenerator.insert leaves them), the last is fed by the running batch's step.
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        return RowsGeneration.joining(self, [t[-1] for t in tokens])


class RowsGenerator(BatchGenerator):  # type: ignore[misc]
    """mlx-lm's generator with troupe's prompt and generation batches, made once and kept
    as long as the generator (as mlx-lm's are): they copy less KV."""

    eager: ClassVar[bool] = False
    """Whether a step returns the tokens it samples (``EagerGenerator``)."""

    # mlx-lm's private names, used only in this block (mlx_lm/generate.py, class
    # BatchGenerator, all set in its __init__): ``_prompt_batch`` and ``_generation_batch``,
    # the batches; ``_counters``, its time and token counts; ``_currently_processing``, per
    # prompt-batch row, [segments left, tokens done, tokens in all].

    def __init__(self, model: Any, *, reserve_rows: int, **options: Any) -> None:
        """``options`` are BatchGenerator's; ``reserve_rows``: the generation batch's KV
        buffer keeps free rows for rows that join, up to this many rows in all."""
        super().__init__(model, **options)
        prompt = EagerPrompt if self.eager else RowsPrompt
        self._prompt_batch = prompt.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        self._generation_batch = RowsGeneration.started(
            self.model, self.sampler, reserve_rows=reserve_rows, eager=self.eager)

    @property
    def prompt_batch(self) -> RowsPrompt:
        """The rows whose prompt is being prefilled."""
        batch: RowsPrompt = self._prompt_batch
        return batch

    @property
    def generation_batch(self) -> RowsGeneration:
        """The rows being decoded."""
        batch: RowsGeneration = self._generation_batch
        return batch

    @property
    def counters(self) -> Any:
        """mlx-lm's BatchCounters: ``prompt_time`` and ``decode_time``, in seconds."""
        return self._counters

    @property
    def prefill_progress(self) -> list[Any]:
        """Per prompt-batch row: [segments left, tokens done, tokens in all]."""
        progress: list[Any] = self._currently_processing
        return progress

    @prefill_progress.setter
    def prefill_progress(self, progress: list[Any]) -> None:
        self._currently_processing = progress


class EagerGenerator(RowsGenerator):
    """mlx-lm's generator with eager steps (``RowsGeneration.eager``): rows that
    finished their prompt join the running batch before its step and feed their last
    prompt token in it, so their first token comes out of that step (mlx-lm stepped
    them on their own, and their first token came out of the step after)."""

    eager: ClassVar[bool] = True

    # mlx-lm's private name, used only in this block: ``_next`` (mlx_lm/generate.py,
    # BatchGenerator._next, which BatchGenerator.next calls): one step of the generation
    # batch, then the prompt batch's rows that finish their prompt move on to it (here
    # through EagerPrompt.generate) and the others prefill their next chunk.

    def _next(self) -> Any:
        # Rows whose prompt the last step finished join first, to step with the batch now.
        joined = self._join_prompted()
        prompt_responses, generation_responses = super()._next()
        return joined + prompt_responses, generation_responses

    # troupe's own code from here on.

    def _join_prompted(self) -> list[Any]:
        """Move the prompt batch's rows with only their last token left to the generation
        batch, as mlx-lm's ``_next`` does after its generation step."""
        progress = self.prefill_progress
        split = [i for i, (segments, _, _) in enumerate(progress)
                 if len(segments) == 1 and len(segments[0]) == 1]
        if not split:
            return []
        last = [progress[i][0][0] for i in split]
        totals = [progress[i][2] for i in split]
        leaving = set(split)
        self.prefill_progress = [p for i, p in enumerate(progress) if i not in leaving]
        joining = self.prompt_batch.split(split).generate(last)
        self.generation_batch.extend(joining)
        return [PromptProcessingBatch.Response(uid, (total, total), True, True)
                for uid, total in zip(joining.uids, totals, strict=True)]
