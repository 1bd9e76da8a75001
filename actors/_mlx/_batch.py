"""mlx-lm's continuous batching behind a small typed surface: ``Batch``.

Engine thread only (MLX streams are thread-local).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import mlx.core as mx

from ._blocks import KVLayers
from ._model import LoadedModel
from ._sampling import GrammarMask, Sampler

if TYPE_CHECKING:
    from ._generator import RowsGenerator


@attrs.frozen
class StepOutput:
    """One generated token of one sequence; a finished one carries its cache back."""

    uid: int
    token: int
    finish_reason: str | None
    cache: KVLayers | None
    all_tokens: list[int] | None


def eager_default() -> bool:
    """Whether batch steps are eager by default: on the CPU. A turn's cache then covers
    its prompt and its reply but the reply's last token (the next turn prefills it)."""
    return bool(mx.default_device().type == mx.cpu)


class Batch:
    """mlx-lm's continuous batching generator behind a small typed surface."""

    def __init__(
        self,
        model: LoadedModel,
        max_batch_size: int,
        prefill_step_size: int,
        *,
        eager: bool | None = None,
    ) -> None:
        """``eager``: a step returns the tokens it samples (the default on the CPU), rather
        than mlx-lm's, which returns the tokens it feeds and samples the next ones
        asynchronously (the default elsewhere). Greedy replies are the same either way."""
        # Imported here, not above: importing mlx-lm takes seconds.
        from ._generator import EagerGenerator, RowsGenerator

        if eager is None:
            eager = eager_default()
        self._model = model
        generator = EagerGenerator if eager else RowsGenerator
        self._generator: RowsGenerator = generator(
            model.model,
            # The generation batch's KV buffer keeps free rows for rows that join.
            reserve_rows=max_batch_size,
            stop_tokens=[[t] for t in sorted(model.info.eos_token_ids)],
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(8, max_batch_size),
            prefill_step_size=prefill_step_size,
        )

    def insert(
        self,
        prompt: list[int],
        history: list[int],
        cache: KVLayers | None,
        sampler: Sampler,
        max_tokens: int,
        processor: GrammarMask | None = None,
    ) -> int:
        """Queue a sequence; ``cache`` must cover exactly ``history``. Returns its uid.
        ``processor`` masks this row's logits (a constrained turn), and no other row's."""
        uids = self._generator.insert(
            [prompt],
            max_tokens=[max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[history],
            samplers=[sampler],
            logits_processors=[[processor] if processor is not None else []],
        )
        return int(uids[0])

    def keep_from(self, uid: int, token: int) -> None:
        """When sequence ``uid`` ends, its cache need only hold tokens from ``token`` on
        (the caller has the rest as blocks): the copy made as it leaves the batch is that
        much smaller. Its cache is then a ``RowSuffix``, which ``cut_blocks`` reads."""
        self._generator.generation_batch.kept_from[uid] = token

    def step(self) -> tuple[list[int], list[StepOutput]]:
        """One step: the uids whose prompt is now wholly in the cache (they moved on to
        generation; their first token comes next step), and the tokens generated."""
        prompted, generated = self._generator.next()
        ended = [int(r.uid) for r in prompted if r.end_of_prompt]
        return ended, [
            StepOutput(
                uid=int(r.uid),
                token=int(r.token),
                finish_reason=r.finish_reason,
                cache=r.prompt_cache,
                all_tokens=list(r.all_tokens) if r.all_tokens is not None else None,
            )
            for r in generated
        ]

    def extract(self, uid: int) -> tuple[KVLayers, list[int]] | None:
        """A sequence's cache mid-flight (a lazy slice of the batch's) and its tokens.

        Copy what you keep of it and let it go before the next ``step``: while it lives, the
        batch's updates of its buffer copy the buffer whole."""
        # Views, not mlx-lm's evaluated copy of the whole row: troupe's cut copies only the
        # blocks it keeps, so a hot turn's first token comes sooner.
        views = self._generator.generation_batch.row_views(uid)
        if views is not None:
            return views
        caches = self._generator.extract_cache([uid])
        if uid not in caches:
            return None
        cache, tokens = caches[uid]
        return cache, list(tokens)

    def remove(self, uid: int) -> tuple[KVLayers, list[int]] | None:
        """Take a sequence out mid-flight; returns its cache and the tokens it covers."""
        caches = self._generator.remove([uid], return_prompt_caches=True)
        self._generator.generation_batch.kept_from.pop(uid, None)
        if uid not in caches:
            return None
        cache, tokens = caches[uid]
        return cache, list(tokens)

    @property
    def prefill_seconds(self) -> float:
        """Time spent prefilling prompts, all told."""
        return float(self._generator.counters.prompt_time)

    @property
    def decode_seconds(self) -> float:
        """Time spent in generation steps, all told."""
        return float(self._generator.counters.decode_time)

    def close(self) -> None:
        """Give back what mlx-lm's generator set up (its wired memory limit)."""
        self._generator.close()


def release_thread_resources() -> None:
    """What a thread that ran BatchGenerator must do before it ends: without it, the
    interpreter aborted at exit ("terminate called without an active exception") in most
    runs, as MLX's thread-local streams outlived their thread."""
    mx.synchronize()
    mx.clear_streams()
