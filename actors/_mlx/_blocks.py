"""KV caches as blocks: a cache's token count, the layout of one token's KV, blocks cut out
of a finished cache and a row's cache put back together from blocks.

Engine thread only, except where a docstring says otherwise (MLX streams are thread-local).
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import mlx.core as mx

KVLayers = list[Any]
"""Per-layer mlx-lm cache objects. Opaque outside the engine thread."""

KVBlock = list[tuple[mx.array, mx.array]]
"""One run of tokens' keys and values, per layer: evaluated, contiguous, owned."""


def cache_tokens(cache: KVLayers) -> int:
    """How many tokens a cache covers."""
    return int(cache[0].offset) if cache else 0


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
        """The layout of an evaluated cache of plain KVCache layers."""
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
    """The bytes of the block's keys and values, all layers."""
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
    # Imported here, not above: importing mlx-lm takes seconds, and blocks need none of it.
    from ._batch_cache import RowKV

    layers = len(parts[0]) if parts else layout.layers
    return [RowKV([part[i][0] for part in parts], [part[i][1] for part in parts], layout, room)
            for i in range(layers)]
