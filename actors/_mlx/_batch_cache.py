"""troupe's subclasses of mlx-lm's KV cache classes (mlx_lm/models/cache.py).

mlx-lm copies a batch's whole KV whenever its rows change: a row's KV was copied four
times on its way in (troupe joined its blocks; mlx-lm merged the rows into a padded
buffer, grew it by concatenation as the prompt came in, and gathered it when the prompt
batch moved on to decoding); the running batch was padded and concatenated (two copies)
for every group joining it, and gathered whenever rows finished; the prompt batch was
deep-copied whenever rows finished their prompt, and rolled whole after every chunk of
prompts of unequal length; a finished row was copied whole. ``BatchKV`` keeps mlx-lm's
left-padded layout and leaves out the copies: a row is copied once, block by block, into
a buffer with room for its prompt and reply; the running batch's buffer keeps free rows
(as many as are live, up to ``max_batch_size`` in all), a row leaving it is filled by one
from the end (one row copied, in place), a group joins into the free rows (its rows
copied, not the batch), and the padding all rows come to share is dropped by moving a
window over the buffer; rows leave the prompt batch as a copy of just those rows, a ragged
chunk moves only the rows it left short, and a finished row is copied from the first token
its caller does not hold as blocks. Why: with many agents, those copies made up most of the
time rows took to join and leave the batch, and raised MLX's peak memory.
tests/test_turns.py, tests/test_engine.py and tests/test_blocks.py pin that replies stay
the same.

Importing this module imports mlx-lm (seconds): troupe imports it when it first needs it.
The mlx-lm private names each class uses are in one block of that class, which names where
in mlx-lm they come from; ``_version.MLX_LM_SUPPORTED`` is the range they were read from.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from ._blocks import BlockLayout


class BatchKV(BatchKVCache):  # type: ignore[misc]
    """mlx-lm's left-padded batch cache in a buffer it reuses. Rows ``[0, live)`` are
    the batch's (``live`` is the length of ``offset``) and the rows after them are free;
    columns ``[start, start + filled)`` hold what mlx-lm's cache would (``filled``,
    ``offset`` and ``left_padding`` keep their meaning), and the columns before
    ``start`` are padding every row shared, dropped without a copy. The buffer is
    replaced only when its columns run out: a window that reaches the end moves back
    to column 0 in place, and a group of longer rows takes back dropped columns."""

    keys: Any
    values: Any
    offset: Any
    left_padding: Any
    start = 0
    reserve_rows = 0
    """Rows a new buffer may keep free for rows that join later (the running batch's:
    its largest size): up to as many as are live, so the buffer doubles as it fills."""

    # mlx-lm's private names, used only in this block: BatchKVCache's ``_idx`` and
    # ``_right_padding``, set in its __init__ (mlx_lm/models/cache.py, class BatchKVCache).
    _idx: int
    _right_padding: Any

    @property
    def filled(self) -> int:
        """Columns of the window in use, the shared left padding included (``_idx``)."""
        return self._idx

    @filled.setter
    def filled(self, columns: int) -> None:
        self._idx = columns

    @property
    def right_padding(self) -> Any:
        """Per row, the columns a ragged prompt chunk left short, or None (set by
        BatchKVCache.prepare, read by its finalize: ``_right_padding``)."""
        return self._right_padding

    @right_padding.setter
    def right_padding(self, padding: Any) -> None:
        self._right_padding = padding

    # troupe's own code from here on.

    @classmethod
    def from_rows(cls, rows: list[RowKV]) -> BatchKV:
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
        cache.filled = longest
        _settle(cache.keys, cache.values)
        return cache

    @property
    def live(self) -> int:
        return int(self.offset.shape[0])

    def _window(self, rows: slice) -> tuple[Any, Any]:
        columns = slice(self.start, self.start + self.filled)
        return self.keys[rows, :, columns], self.values[rows, :, columns]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        if self.keys is None:
            return super().update_and_fetch(keys, values)
        live, n = keys.shape[0], keys.shape[2]
        if (self.start + self.filled + n > self.keys.shape[2]
                and self.filled + n + self.step // 4 <= self.keys.shape[2]):
            # Out of room at the end but not at the front (dropped padding): the window
            # moves back to column 0 in place, rather than into a new buffer.
            self._rebase()
        if self.start + self.filled + n > self.keys.shape[2]:
            # Out of room: a new buffer, grown by whole steps as mlx-lm does.
            grow = -(-n // self.step) * self.step
            pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
            rows = max(live, min(self.keys.shape[0], self.reserve_rows))
            window = self._window(slice(0, rows))
            self.keys, self.values = mx.pad(window[0], pad), mx.pad(window[1], pad)
            self.start = 0
            _settle(self.keys, self.values)
        at = self.start + self.filled
        self.offset = self.offset + n
        self.filled += n
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
        self.keys[:live, :, : self.filled] = moved[0]
        self.values[:live, :, : self.filled] = moved[1]
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
            self.filled -= shift
            self.left_padding -= shift

    def extend(self, other: Any) -> None:
        if not isinstance(other, BatchKV) or self.keys is None or other.keys is None:
            for cache in (self, other):
                if isinstance(cache, BatchKV):
                    cache._compact()
            super().extend(other)
            return
        live, joining = self.live, other.live
        wider = other.filled - self.filled
        if live + joining <= self.keys.shape[0] and 0 < wider <= self.start:
            # The group's rows are longer: the window takes back columns of the padding
            # it dropped (padding again for the rows here; their old values are finite).
            self.start -= wider
            self.filled += wider
            self.left_padding = self.left_padding + wider
        if live + joining <= self.keys.shape[0] and other.filled <= self.filled:
            # The group fits in the free rows, right-aligned like the rest: only its
            # rows are copied, not the whole batch.
            other._place(self.keys, self.values, live, self.start + self.filled, 0)
            self.offset = mx.concatenate([self.offset, other.offset])
            self.left_padding = mx.concatenate(
                [self.left_padding, other.left_padding + self.filled - other.filled])
            return
        # As mlx-lm lays it out (both right-aligned at the longer end, the larger room),
        # but one copy into a new buffer, not a padded copy concatenated into another,
        # and without the padding every row would share.
        longer = max(self.filled, other.filled)
        shared = min(min(self.left_padding.tolist()) + longer - self.filled,
                     min(other.left_padding.tolist()) + longer - other.filled)
        end = longer - shared
        capacity = max(self.keys.shape[2] - self.start, other.keys.shape[2] - other.start)
        _, heads, _, key_dim = self.keys.shape
        rows = max(live + joining, min(2 * (live + joining), self.reserve_rows))
        keys = mx.zeros((rows, heads, capacity - shared, key_dim), self.keys.dtype)
        values = mx.zeros((rows, heads, capacity - shared, self.values.shape[3]),
                          self.values.dtype)
        paddings = []
        for first, cache in ((0, self), (live, other)):
            skip = max(0, cache.filled - end)  # columns of the shared padding, left out
            cache._place(keys, values, first, end, skip)
            paddings.append(cache.left_padding + end - cache.filled)
        _settle(keys, values)
        self.keys, self.values, self.start = keys, values, 0
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate(paddings)
        self.filled = end

    def _place(self, keys: mx.array, values: mx.array, first: int, end: int,
               skip: int) -> None:
        """Copy this cache's live rows into rows ``first`` on of ``keys``/``values``, their
        window right-aligned to column ``end``, leaving out its first ``skip`` columns."""
        rows = slice(first, first + self.live)
        source_keys, source_values = self._window(slice(0, self.live))
        columns = slice(end - self.filled + skip, end)
        keys[rows, :, columns] = source_keys[..., skip:, :]
        values[rows, :, columns] = source_values[..., skip:, :]

    def finalize(self) -> None:
        # mlx-lm rolls the whole buffer to right-align the rows a ragged prompt chunk
        # left short (a copy of the prompt batch per chunk): only those rows move here.
        padding = self.right_padding
        if padding is None or self.keys is None:
            super().finalize()
            return
        self._move_rows([(i, i, p) for i, p in enumerate(padding.tolist()) if p > 0])
        self.offset = self.offset - padding
        self.left_padding = self.left_padding + padding
        self.right_padding = None

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
            columns = slice(self.start + shift, self.start + self.filled)
            self.keys[to : to + 1, :, columns] = k
            self.values[to : to + 1, :, columns] = v

    def take(self, rows: list[int]) -> BatchKV:
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

    def row_view(self, idx: int) -> KVCache:
        """Row ``idx`` as a plain cache of views into the buffer."""
        padding = int(self.left_padding[idx].item())
        row = slice(self.start + padding, self.start + self.filled)
        cache = KVCache()
        cache.keys = self.keys[idx : idx + 1, :, row]
        cache.values = self.values[idx : idx + 1, :, row]
        cache.offset = self.filled - padding
        return cache

    def extract(self, idx: int, first: int = 0) -> RowSuffix:
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
    """One layer of a row waiting to join the batch: its KV as parts, not yet copied,
    and room for the tokens to come (``row_cache`` makes them)."""

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
    def merge(cls, caches: list[Any]) -> BatchKV:
        # mlx-lm merges with the first row's class; troupe hands every row in as a RowKV.
        return BatchKV.from_rows(caches)


def _settle(keys: mx.array, values: mx.array) -> None:
    """Evaluate a layer's new buffer now, so the one it replaces is freed before the next
    layer's is made (lazily, every layer's new buffer came to exist beside its old one)."""
    mx.eval(keys, values)


def _zeros(layout: BlockLayout, rows: int, capacity: int) -> tuple[mx.array, mx.array]:
    heads, key_dim = layout.key_shape
    dtype = getattr(mx, layout.dtype)
    return (mx.zeros((rows, heads, capacity, key_dim), dtype),
            mx.zeros((rows, heads, capacity, layout.value_dim), dtype))
