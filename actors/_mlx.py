"""The typed adapter around mlx-lm: the one module that knows its internals.

mlx-lm is untyped and moves fast; troupe uses its loader, chat templates, KV cache classes
and ``BatchGenerator``, all through this module. Everything that makes or evaluates MLX
arrays here must run on the engine thread (MLX streams are thread-local).
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import attrs
import mlx.core as mx

from .._errors import ModelLoadError
from .._records import GREEDY_BELOW, Sampling

# Per-layer mlx-lm cache objects. Opaque outside the engine thread.
KVLayers = list[Any]
Sampler = Callable[[mx.array], mx.array]


@attrs.frozen
class ModelInfo:
    """What the runtime knows about its model."""

    path: str
    name: str
    context_length: int
    num_layers: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    kv_bytes_per_token: int
    """Measured: the nbytes of one token's keys and values over all layers."""
    persistable_cache: bool
    """Whether the model's cache is plain KVCache layers, the kind troupe cuts into blocks."""


def _context_length(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return _context_length(text_config)
    return 4096


# transformers' VERY_LARGE_INTEGER: a tokenizer's model_max_length when there is none.
NO_LENGTH_LIMIT = int(1e30)


class Tokenizer:
    """mlx-lm's tokenizer behind a typed surface. Not for concurrent use: one caller at a
    time per instance (``copy`` makes another)."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped
        if hasattr(wrapped, "model_max_length"):
            # troupe checks prompts against the context itself (ContextLengthError): the
            # tokenizer's own check only printed a warning on stderr before that error.
            wrapped.model_max_length = NO_LENGTH_LIMIT  # mlx-lm forwards it to transformers
        self._has_template = bool(getattr(wrapped, "has_chat_template", False))
        try:
            vocab: dict[str, int] = wrapped.get_vocab()
            longest = max(len(piece) for piece in vocab)
        except Exception:  # a tokenizer without a vocabulary to read: assume long pieces
            longest = 64
        self.max_token_chars = max(1, longest)
        """The longest vocabulary piece, in characters: a token never spells more text."""

    def copy(self) -> Tokenizer:
        return Tokenizer(copy.deepcopy(self._wrapped))

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` under the chat template, ready for the reply.

        ValueError if the model's template refuses the conversation.
        """
        if self._has_template:
            try:
                ids = self._wrapped.apply_chat_template(
                    list(messages), add_generation_prompt=True, tokenize=True
                )
            except Exception as exc:
                raise ValueError(f"the model's chat template refused the conversation: {exc}") \
                    from exc
            return [int(t) for t in ids]
        # A base model without a template gets a plain transcript.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return [int(t) for t in self._wrapped.encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        text: str = self._wrapped.decode(list(tokens), skip_special_tokens=False)
        return text


class LoadedModel:
    """A model and its tokenizer, loaded on the engine thread."""

    def __init__(self, path: Path) -> None:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        try:
            from mlx_lm import load
            from mlx_lm.models.cache import KVCache, make_prompt_cache

            self.model, wrapped = load(str(path))
            config = json.loads(config_file.read_text())
            probe = make_prompt_cache(self.model)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the model at {path}: {exc}") from exc
        self.tokenizer = Tokenizer(wrapped)
        layers = len(probe)
        blocks = all(type(c) is KVCache for c in probe)
        self.layout: BlockLayout | None = None
        # One real token through the model, evaluated: the cache's true shapes, dtype and
        # bytes; and MLX's first compiled kernel runs now, while the model loads. On CPU
        # that first run checks for a C++ compiler with system(), which ignores Ctrl-C in
        # the whole process while it runs: better here than in the middle of a turn.
        try:
            mx.eval(self.model(mx.array([[0]]), cache=probe))
            if blocks:
                self.layout = BlockLayout.of(probe)
        except Exception as exc:
            raise ModelLoadError(f"the model at {path} failed a one-token probe: {exc}") \
                from exc
        self.info = ModelInfo(
            path=str(path),
            name=path.name,
            context_length=_context_length(config),
            num_layers=layers,
            vocab_size=int(config.get("vocab_size", 0)),
            eos_token_ids=frozenset(int(t) for t in wrapped.eos_token_ids),
            kv_bytes_per_token=self.layout.bytes_per_token if self.layout else 0,
            persistable_cache=blocks,
        )


class TextStream:
    """Incremental detokenization that agrees with decoding the whole sequence at once.

    It decodes a short window (the previous emitted tokens as a prefix) so that tokenizers
    which drop or merge leading spaces still produce the right characters.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._model = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self._tokens.append(token)
        prefix_text = self._model.decode(self._tokens[self._prefix : self._read])
        new_text = self._model.decode(self._tokens[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._model.decode(self._tokens[self._prefix : self._read])
        new_text = self._model.decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return new_text[len(prefix_text) :]


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(sampling: Sampling, seed: int) -> Sampler:
    """A per-turn sampler. Greedy turns share one function, so the batch samples them at once."""
    if sampling.temperature < GREEDY_BELOW:
        return _greedy
    from mlx_lm.sample_utils import apply_top_p

    key = mx.random.key(seed)
    inverse_temperature = 1.0 / sampling.temperature
    top_p = sampling.top_p

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        # A key of its own per turn: the turn's draws do not depend on its batch mates.
        key, subkey = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * inverse_temperature, key=subkey)

    return sample


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
        from mlx_lm.generate import BatchGenerator

        if eager is None:
            eager = eager_default()
        self._model = model
        self._generator = BatchGenerator(
            model.model,
            stop_tokens=[[t] for t in sorted(model.info.eos_token_ids)],
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(8, max_batch_size),
            prefill_step_size=prefill_step_size,
        )
        # The generation batch and the prompt batch are made once and live as long as the
        # generator: troupe's classes for them copy less KV.
        types = _cache_types()
        generation = self._generator._generation_batch
        generation.__class__ = types.rows_generation
        generation.reserve_rows = max_batch_size
        generation.kept_from = {}
        generation.eager = eager
        self._generator._prompt_batch.__class__ = types.rows_prompt
        if eager:
            self._generator.__class__ = types.eager_generator

    def insert(
        self,
        prompt: list[int],
        history: list[int],
        cache: KVLayers | None,
        sampler: Sampler,
        max_tokens: int,
    ) -> int:
        """Queue a sequence; ``cache`` must cover exactly ``history``. Returns its uid."""
        uids = self._generator.insert(
            [prompt],
            max_tokens=[max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[history],
            samplers=[sampler],
        )
        return int(uids[0])

    def keep_from(self, uid: int, token: int) -> None:
        """When sequence ``uid`` ends, its cache need only hold tokens from ``token`` on
        (the caller has the rest as blocks): the copy made as it leaves the batch is that
        much smaller. Its cache is then a ``RowSuffix``, which ``cut_blocks`` reads."""
        self._generator._generation_batch.kept_from[uid] = token

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
        generation = self._generator._generation_batch
        batch_kv = _cache_types().batch_kv
        if uid in generation.uids and all(isinstance(c, batch_kv)
                                          for c in generation.prompt_cache):
            # Views, not mlx-lm's evaluated copy of the whole row: troupe's cut copies only
            # the blocks it keeps (a hot turn's first token came ~20 ms later with the copy).
            idx = generation.uids.index(uid)
            return ([c.row_view(idx) for c in generation.prompt_cache],
                    list(generation.tokens[idx]))
        caches = self._generator.extract_cache([uid])
        if uid not in caches:
            return None
        cache, tokens = caches[uid]
        return cache, list(tokens)

    def remove(self, uid: int) -> tuple[KVLayers, list[int]] | None:
        """Take a sequence out mid-flight; returns its cache and the tokens it covers."""
        caches = self._generator.remove([uid], return_prompt_caches=True)
        self._generator._generation_batch.kept_from.pop(uid, None)
        if uid not in caches:
            return None
        cache, tokens = caches[uid]
        return cache, list(tokens)

    @property
    def prefill_seconds(self) -> float:
        return float(self._generator._counters.prompt_time)

    @property
    def decode_seconds(self) -> float:
        return float(self._generator._counters.decode_time)

    def close(self) -> None:
        self._generator.close()


def cache_tokens(cache: KVLayers) -> int:
    """How many tokens a cache covers."""
    return int(cache[0].offset) if cache else 0


KVBlock = list[tuple[mx.array, mx.array]]
"""One run of tokens' keys and values, per layer: evaluated, contiguous, owned."""


@attrs.frozen
class BlockLayout:
    """The shape of one token's KV in every layer, to rebuild blocks from bytes."""

    key_shape: tuple[int, ...]
    """(kv_heads, head_dim) of keys; values share the heads."""
    value_dim: int
    dtype: str
    layers: int
    bytes_per_token: int

    @classmethod
    def of(cls, cache: KVLayers) -> BlockLayout:
        first = cache[0]
        _, heads, _, dim = first.keys.shape
        per_token = sum(
            layer.keys.nbytes // layer.keys.shape[2] + layer.values.nbytes // layer.values.shape[2]
            for layer in cache
        )
        return cls((heads, dim), int(first.values.shape[3]), str(first.keys.dtype).split(".")[-1],
                   len(cache), int(per_token))

    def empty(self, tokens: int) -> KVBlock:
        """A block of ``tokens`` tokens, evaluated and zeroed, to be filled in place through
        ``block_bytes`` (engine thread; the filling may happen on any thread, before the
        block is used)."""
        dtype = getattr(mx, self.dtype)
        heads, dim = self.key_shape
        block = [(mx.zeros((1, heads, tokens, dim), dtype),
                  mx.zeros((1, heads, tokens, self.value_dim), dtype))
                 for _ in range(self.layers)]
        mx.eval(block)
        return block


def block_bytes(block: KVBlock) -> list[memoryview]:
    """The block's bytes, layer by layer, keys then values (zero-copy, writable views).

    Made on the engine thread; the views may then be used on any thread.
    """
    return [memoryview(cast(Any, a)).cast("B") for pair in block for a in pair]


def block_nbytes(block: KVBlock) -> int:
    return sum(k.nbytes + v.nbytes for k, v in block)


def cut_blocks(
    cache: KVLayers, start: int, block_size: int, *, tail: bool
) -> tuple[list[KVBlock], KVBlock | None]:
    """Copies of the cache's full blocks from token ``start`` (a block boundary) on, and
    of the partial tail after them if ``tail``. Evaluated: nothing keeps the cache alive."""
    covered = cache_tokens(cache)
    skipped = int(getattr(cache[0], "skipped", 0))  # a RowSuffix holds tokens from there on
    if start < skipped:
        raise ValueError(f"blocks from token {start} of a cache that starts at {skipped}")
    full_end = covered - covered % block_size
    spans = [(s - skipped, s + block_size - skipped)
             for s in range(start, full_end, block_size)]
    if tail and full_end < covered:
        spans.append((full_end - skipped, covered - skipped))
    pieces: list[KVBlock] = [
        [(mx.contiguous(layer.keys[..., a:b, :]), mx.contiguous(layer.values[..., a:b, :]))
         for layer in cache]
        for a, b in spans
    ]
    mx.eval(pieces)
    if tail and full_end < covered:
        return pieces[:-1], pieces[-1]
    return pieces, None


def row_cache(parts: list[KVBlock], layout: BlockLayout, room: int) -> KVLayers:
    """One sequence's cache as the batch takes it: ``parts`` end to end, not yet copied.

    The batch copies the parts once, straight into its own buffer, with room for ``room``
    more tokens (the turn's prompt and reply), so it need not grow while they come in.
    """
    row_kv = _cache_types().row_kv
    layers = len(parts[0]) if parts else layout.layers
    return [row_kv([part[i][0] for part in parts], [part[i][1] for part in parts], layout, room)
            for i in range(layers)]


class _Types(NamedTuple):
    batch_kv: Any
    row_kv: Any
    rows_generation: Any
    rows_prompt: Any
    eager_generator: Any


@functools.cache
def _cache_types() -> _Types:
    """troupe's mlx-lm batch classes, made on first use (importing mlx-lm is slow).

    mlx-lm copies a batch's whole KV whenever its rows change: a row's KV was copied four
    times on its way in (troupe joined its blocks; mlx-lm merged the rows into a padded
    buffer, grew it by concatenation as the prompt came in, and gathered it when the prompt
    batch moved on to decoding); the running batch was padded and concatenated (two copies)
    for every group joining it, and gathered whenever rows finished; the prompt batch was
    deep-copied whenever rows finished their prompt, and rolled whole after every chunk of
    prompts of unequal length; a finished row was copied whole. These subclasses keep
    mlx-lm's left-padded layout and leave out the copies: a row is copied once, block by
    block, into a buffer with room for its prompt and reply; the running batch's buffer
    keeps free rows (as many as are live, up to ``max_batch_size`` in all), a row leaving
    it is filled by one from the end (one row copied, in place), a group joins into the
    free rows (its rows copied, not the batch), and the padding all rows come to share is
    dropped by moving a window over the buffer; rows leave the prompt batch as a copy of
    just those rows, a ragged chunk moves only the rows it left short, and a finished row
    is copied from the first token its caller does not hold as blocks. In a crowd-like
    round (64 agents, ~1,700-token contexts, batch 32) the joins went from 9.0 s to 1.0 s
    and the leaves from 4.4 s to 0.7 s, the round from 47-50 s to 38 s; the prompt batch's
    and finished rows' copies took MLX's peak from 2,243 to 2,074-2,111 MB.
    tests/test_turns.py, tests/test_engine.py and tests/test_blocks.py pin that replies
    stay the same.
    """
    from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
    from mlx_lm.models.cache import BatchKVCache, KVCache

    class BatchKV(BatchKVCache):  # type: ignore[misc]
        """mlx-lm's left-padded batch cache in a buffer it reuses. Rows ``[0, live)`` are
        the batch's (``live`` is the length of ``offset``) and the rows after them are free;
        columns ``[start, start + _idx)`` hold what mlx-lm's cache would (``_idx``,
        ``offset`` and ``left_padding`` keep their meaning), and the columns before
        ``start`` are padding every row shared, dropped without a copy. The buffer is
        replaced only when its columns run out: a window that reaches the end moves back
        to column 0 in place, and a group of longer rows takes back dropped columns."""

        keys: Any
        values: Any
        offset: Any
        left_padding: Any
        _right_padding: Any
        _idx: int
        start = 0
        reserve_rows = 0
        """Rows a new buffer may keep free for rows that join later (the running batch's:
        its largest size): up to as many as are live, so the buffer doubles as it fills."""

        @classmethod
        def from_rows(cls, rows: list[RowKV]) -> Any:
            """Rows left-padded to the longest, copied once from their parts, with room."""
            lengths = [int(row.offset) for row in rows]
            longest = max(lengths)
            capacity = -(-(longest + max(row.room for row in rows)) // cls.step) * cls.step
            cache = cls([longest - n for n in lengths])
            cache.keys, cache.values = _zeros(rows[0].layout, len(rows), capacity)
            for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
                at = longest - length
                for k, v in row.parts:
                    n = k.shape[2]
                    cache.keys[i : i + 1, :, at : at + n, :] = k
                    cache.values[i : i + 1, :, at : at + n, :] = v
                    at += n
            cache.offset += longest
            cache._idx = longest
            _settle(cache.keys, cache.values)
            return cache

        @property
        def live(self) -> int:
            return int(self.offset.shape[0])

        def _window(self, rows: slice) -> tuple[Any, Any]:
            columns = slice(self.start, self.start + self._idx)
            return self.keys[rows, :, columns], self.values[rows, :, columns]

        def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
            if self.keys is None:
                return super().update_and_fetch(keys, values)
            live, n = keys.shape[0], keys.shape[2]
            if (self.start + self._idx + n > self.keys.shape[2]
                    and self._idx + n + self.step // 4 <= self.keys.shape[2]):
                # Out of room at the end but not at the front (dropped padding): the window
                # moves back to column 0 in place, rather than into a new buffer.
                self._rebase()
            if self.start + self._idx + n > self.keys.shape[2]:
                # Out of room: a new buffer, grown by whole steps as mlx-lm does.
                grow = -(-n // self.step) * self.step
                pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
                rows = max(live, min(self.keys.shape[0], self.reserve_rows))
                window = self._window(slice(0, rows))
                self.keys, self.values = mx.pad(window[0], pad), mx.pad(window[1], pad)
                self.start = 0
                _settle(self.keys, self.values)
            at = self.start + self._idx
            self.offset = self.offset + n
            self._idx += n
            self.keys[:live, :, at : at + n, :] = keys
            self.values[:live, :, at : at + n, :] = values
            return self.keys_and_values()

        def keys_and_values(self) -> Any:
            return self._window(slice(0, self.live))

        def _rebase(self) -> None:
            """Move the live rows' window to column 0, in place: copied out, then back."""
            live = self.live
            moved = [mx.contiguous(a) for a in self._window(slice(0, live))]
            mx.eval(moved)
            self.keys[:live, :, : self._idx] = moved[0]
            self.values[:live, :, : self._idx] = moved[1]
            self.start = 0
            # Now, so this layer's copy is freed (for the next layer's to reuse) before the
            # next layer's is made.
            _settle(self.keys, self.values)

        def filter(self, batch_indices: list[int]) -> None:
            keep = list(batch_indices)
            if self.keys is None:
                super().filter(keep)
                return
            moves = [(to, row, 0) for to, row in enumerate(keep) if to != row]
            if self.keys.shape[0] >= 4 * len(keep):
                # Mostly free rows: a compact buffer.
                rows = mx.array(keep)
                self.keys = self.keys[rows]
                self.values = self.values[rows]
                _settle(self.keys, self.values)
            elif moves:
                # Copy the rows that move out first, so nothing else reads the buffer and
                # MLX updates it in place (the moved rows copied, not the batch gathered);
                # with every source copied first, any order of rows is safe.
                self._move_rows(moves)
            rows = mx.array(keep)
            self.offset = self.offset[rows]
            self.left_padding = self.left_padding[rows]
            # Drop the padding every row now shares, as mlx-lm does, but by moving the
            # window: mlx-lm's shortened view made its next update copy the batch.
            shift = min(self.left_padding.tolist())
            if shift > 0:
                self.start += shift
                self._idx -= shift
                self.left_padding -= shift

        def extend(self, other: Any) -> None:
            if not isinstance(other, BatchKV) or self.keys is None or other.keys is None:
                for cache in (self, other):
                    if isinstance(cache, BatchKV):
                        cache._compact()
                super().extend(other)
                return
            live, joining = self.live, other.live
            wider = other._idx - self._idx
            if live + joining <= self.keys.shape[0] and 0 < wider <= self.start:
                # The group's rows are longer: the window takes back columns of the padding
                # it dropped (padding again for the rows here; their old values are finite).
                self.start -= wider
                self._idx += wider
                self.left_padding = self.left_padding + wider
            if live + joining <= self.keys.shape[0] and other._idx <= self._idx:
                # The group fits in the free rows, right-aligned like the rest: only its
                # rows are copied, not the whole batch.
                _place(self.keys, self.values, live, self.start + self._idx, other, 0)
                self.offset = mx.concatenate([self.offset, other.offset])
                self.left_padding = mx.concatenate(
                    [self.left_padding, other.left_padding + self._idx - other._idx])
                return
            # As mlx-lm lays it out (both right-aligned at the longer end, the larger room),
            # but one copy into a new buffer, not a padded copy concatenated into another,
            # and without the padding every row would share.
            longer = max(self._idx, other._idx)
            shared = min(min(self.left_padding.tolist()) + longer - self._idx,
                         min(other.left_padding.tolist()) + longer - other._idx)
            end = longer - shared
            capacity = max(self.keys.shape[2] - self.start, other.keys.shape[2] - other.start)
            _, heads, _, key_dim = self.keys.shape
            rows = max(live + joining, min(2 * (live + joining), self.reserve_rows))
            keys = mx.zeros((rows, heads, capacity - shared, key_dim), self.keys.dtype)
            values = mx.zeros((rows, heads, capacity - shared, self.values.shape[3]),
                              self.values.dtype)
            paddings = []
            for first, cache in ((0, self), (live, other)):
                skip = max(0, cache._idx - end)  # columns of the shared padding, left out
                _place(keys, values, first, end, cache, skip)
                paddings.append(cache.left_padding + end - cache._idx)
            _settle(keys, values)
            self.keys, self.values, self.start = keys, values, 0
            self.offset = mx.concatenate([self.offset, other.offset])
            self.left_padding = mx.concatenate(paddings)
            self._idx = end

        def finalize(self) -> None:
            # mlx-lm rolls the whole buffer to right-align the rows a ragged prompt chunk
            # left short (a copy of the prompt batch per chunk): only those rows move here.
            padding = self._right_padding
            if padding is None or self.keys is None:
                super().finalize()
                return
            self._move_rows([(i, i, p) for i, p in enumerate(padding.tolist()) if p > 0])
            self.offset = self.offset - padding
            self.left_padding = self.left_padding + padding
            self._right_padding = None

        def _move_rows(self, moves: list[tuple[int, int, int]]) -> None:
            """For each (to, row, shift) of ``moves``, row ``row``'s KV to row ``to``,
            ``shift`` columns to the right: each source row is copied out first (so MLX
            updates the buffer in place), then written back. A right shift drops the row's
            last ``shift`` columns and leaves its first ones as they were (padding, masked).
            """
            moved = []
            for _, row, shift in moves:
                keys, values = self._window(slice(row, row + 1))
                end = keys.shape[2] - shift
                moved.append((mx.contiguous(keys[..., :end, :]),
                              mx.contiguous(values[..., :end, :])))
            mx.eval(moved)
            for (to, _, shift), (k, v) in zip(moves, moved, strict=True):
                columns = slice(self.start + shift, self.start + self._idx)
                self.keys[to : to + 1, :, columns] = k
                self.values[to : to + 1, :, columns] = v

        def take(self, rows: list[int]) -> Any:
            """A new cache of ``rows`` (an evaluated copy of just those rows)."""
            taken = copy.copy(self)
            index = mx.array(rows)
            taken.keys, taken.values = (a[index, :, self.start :] for a in (self.keys,
                                                                             self.values))
            taken.offset, taken.left_padding = self.offset[index], self.left_padding[index]
            taken.start = 0
            mx.eval(taken.keys, taken.values, taken.offset, taken.left_padding)
            return taken

        def _compact(self) -> None:
            """Only the live rows and the window (views), for mlx-lm's own code."""
            if self.keys is not None and (self.keys.shape[0] > self.live or self.start):
                self.keys, self.values = (a[: self.live, :, self.start :]
                                          for a in (self.keys, self.values))
                self.start = 0

        def row_view(self, idx: int) -> Any:
            """Row ``idx`` as a plain cache of views into the buffer."""
            padding = int(self.left_padding[idx].item())
            row = slice(self.start + padding, self.start + self._idx)
            cache = KVCache()
            cache.keys = self.keys[idx : idx + 1, :, row]
            cache.values = self.values[idx : idx + 1, :, row]
            cache.offset = self._idx - padding
            return cache

        def extract(self, idx: int, first: int = 0) -> Any:
            """Row ``idx`` as an evaluated copy of its tokens from ``first`` on (a
            ``RowSuffix``; the tokens before it are the caller's already)."""
            # mlx-lm takes a finished row out just before the batch's filter moves rows in
            # place: a copy, so no view shares the buffer when the moves run (one would
            # make them copy the whole batch).
            view = self.row_view(idx)
            cache = RowSuffix(first)
            cache.keys, cache.values = (mx.contiguous(a[..., first:, :])
                                        for a in (view.keys, view.values))
            cache.offset = view.offset
            mx.eval(cache.keys, cache.values)
            return cache

    class RowSuffix(KVCache):  # type: ignore[misc]
        """A finished row's cache that holds only its tokens from ``skipped`` on:
        ``offset`` counts them all, ``keys`` and ``values`` start at token ``skipped``."""

        def __init__(self, skipped: int) -> None:
            super().__init__()
            self.skipped = skipped

    class RowKV(KVCache):  # type: ignore[misc]
        keys: Any
        values: Any

        def __init__(
            self, keys: list[mx.array], values: list[mx.array], layout: BlockLayout, room: int
        ) -> None:
            super().__init__()
            self.parts = list(zip(keys, values, strict=True))
            self.layout = layout
            self.room = room
            self.offset = sum(int(k.shape[2]) for k in keys)
            if keys:
                # For mlx-lm code that reads a waiting row directly (one removed before it
                # joined the batch). Lazy: the batch's merge never evaluates it.
                self.keys = keys[0] if len(keys) == 1 else mx.concatenate(keys, axis=2)
                self.values = values[0] if len(values) == 1 else mx.concatenate(values, axis=2)

        @classmethod
        def merge(cls, caches: list[Any]) -> Any:
            # mlx-lm merges with the first row's class; troupe hands every row in as a RowKV.
            return BatchKV.from_rows(caches)

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

    return _Types(BatchKV, RowKV, RowsGeneration, RowsPrompt, EagerGenerator)


def _place(keys: mx.array, values: mx.array, first: int, end: int, source: Any,
           skip: int) -> None:
    """Copy ``source``'s live rows into rows ``first`` on of ``keys``/``values``, their
    window right-aligned to column ``end``, leaving out its first ``skip`` columns."""
    rows = slice(first, first + source.live)
    source_keys, source_values = source._window(slice(0, source.live))
    columns = slice(end - source._idx + skip, end)
    keys[rows, :, columns] = source_keys[..., skip:, :]
    values[rows, :, columns] = source_values[..., skip:, :]


def _settle(keys: mx.array, values: mx.array) -> None:
    """Evaluate a layer's new buffer now, so the one it replaces is freed before the next
    layer's is made (lazily, every layer's new buffer came to exist beside its old one)."""
    mx.eval(keys, values)


def _zeros(layout: BlockLayout, rows: int, capacity: int) -> tuple[mx.array, mx.array]:
    heads, key_dim = layout.key_shape
    dtype = getattr(mx, layout.dtype)
    return (mx.zeros((rows, heads, capacity, key_dim), dtype),
            mx.zeros((rows, heads, capacity, layout.value_dim), dtype))


def release_thread_resources() -> None:
    """What a thread that ran BatchGenerator must do before it ends (see DESIGN.md)."""
    mx.synchronize()
    mx.clear_streams()
