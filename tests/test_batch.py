"""The MLX adapter: on the real tiny model, eager steps (a step returns the tokens it
samples, the CPU's default) against mlx-lm's pipelined steps (which return the tokens
they feed, a step later), counted in steps, never timed; and blocks made back from the
bytes a store keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import attrs
import mlx.core as mx
import pytest

from troupe._errors import StoreError
from troupe._records import Sampling
from troupe.actors._mlx import (
    Batch,
    BlockLayout,
    LoadedModel,
    block_bytes,
    block_nbytes,
    cache_tokens,
    make_sampler,
)
from troupe.storage._kvdir import KVDir, block_file_name

PROMPTS = [list(range(40, 40 + n)) for n in (23, 9, 31)]
LATE = list(range(60, 77))  # joins while the others decode
MAX_TOKENS = 12


@attrs.define
class Seen:
    prompt: int
    tokens: list[int] = attrs.field(factory=list)
    first_step: int = 0
    covered: int | None = None
    """Tokens the finished sequence's cache covers."""


def _run(model: LoadedModel, *, eager: bool) -> dict[int, Seen]:
    batch = Batch(model, max_batch_size=4, prefill_step_size=8, eager=eager)
    seen: dict[int, Seen] = {}

    def insert(prompt: list[int]) -> None:
        uid = batch.insert(prompt, [], None, make_sampler(Sampling(), 0), MAX_TOKENS)
        seen[uid] = Seen(len(prompt))

    for prompt in PROMPTS:
        insert(prompt)
    steps = 0
    try:
        while any(s.covered is None for s in seen.values()):
            steps += 1
            _, outputs = batch.step()
            for out in outputs:
                record = seen[out.uid]
                record.tokens.append(out.token)
                record.first_step = record.first_step or steps
                if out.finish_reason is not None:
                    assert out.cache is not None
                    assert out.all_tokens is not None
                    assert cache_tokens(out.cache) == len(out.all_tokens)
                    record.covered = len(out.all_tokens)
            if steps == 6:
                insert(LATE)
    finally:
        batch.close()
    return seen


def test_eager_steps_give_the_same_replies_a_step_sooner(tiny_model: Path) -> None:
    model = LoadedModel(tiny_model)
    eager = _run(model, eager=True)
    pipelined = _run(model, eager=False)
    assert len(eager) == len(pipelined) == 4
    assert len({s.first_step for s in eager.values()}) == 4  # each joined at its own step
    for uid, record in eager.items():
        other = pipelined[uid]
        assert record.tokens == other.tokens
        assert len(record.tokens) == MAX_TOKENS
        # The first token comes out of the step that feeds the prompt's last token...
        assert record.first_step == other.first_step - 1
        # ...and the cache covers the reply but its last token, which no step fed (the
        # next turn prefills it); mlx-lm's last step fed it and sampled one more.
        assert record.covered == record.prompt + MAX_TOKENS - 1
        assert other.covered == other.prompt + MAX_TOKENS


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_block_comes_back_from_its_file_bit_for_bit(dtype: str, tmp_path: Path) -> None:
    # What a store and a restore do with a block, for each dtype a model's KV may have:
    # written as its bytes, read back into an empty block's arrays.
    kind = getattr(mx, dtype)
    shape = (1, 2, 5, 3)
    block = [(mx.random.normal(shape).astype(kind), mx.random.normal(shape).astype(kind) * 7)
             for _ in range(3)]
    mx.eval(block)
    layout = BlockLayout((2, 3), 3, dtype, 3, block_nbytes(block) // 5)
    kv = KVDir(tmp_path)
    record = kv.write(block_file_name(b"\1" * 16, 1), block_bytes(block))
    again = layout.empty(5)
    kv.read_into(record, block_bytes(again))
    assert len(again) == len(block)
    for (keys, values), (keys2, values2) in zip(block, again, strict=True):
        for a, b in ((keys, keys2), (values, values2)):
            assert b.dtype == kind
            assert b.shape == shape
            assert bytes(memoryview(cast(Any, b))) == bytes(memoryview(cast(Any, a)))
    # A file that is not the size of the block it should fill is refused before reading.
    with pytest.raises(StoreError, match="damaged"):
        kv.read_into(record, block_bytes(layout.empty(4)))
