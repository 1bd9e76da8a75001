"""Every bad input gets its own typed error, and the runtime keeps serving the others."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import troupe
from conftest import TINY


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_tokens": 0}, ValueError),
        ({"max_tokens": 2.5}, TypeError),
        ({"temperature": -0.1}, ValueError),
        ({"temperature": float("nan")}, ValueError),
        ({"top_p": 0.0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"seed": -1}, ValueError),
        ({"seed": "7"}, TypeError),
        ({"stop": ""}, ValueError),
        ({"stop": [3]}, TypeError),
    ],
)
def test_bad_sampling_values_are_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        troupe.Sampling(**kwargs)


async def test_each_bad_input_gets_its_error_while_other_agents_keep_working() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        worker = await rt.spawn("worker", system="You keep talking.")
        bystander = await rt.spawn("bystander")
        expected = await bystander.say("Baseline.", max_tokens=6)
        first_delta = trio.Event()
        long_reply: list[troupe.Reply] = []

        async def long_turn() -> None:
            stream = worker.stream("Talk for a while.", max_tokens=300)
            async for _ in stream:
                first_delta.set()
            assert stream.reply is not None
            long_reply.append(stream.reply)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_turn)
            await first_delta.wait()  # the long turn is in the batch from here on
            assert rt.statistics().turns_in_flight == 1

            with pytest.raises(troupe.AgentNotFoundError):
                await rt.get("nobody")
            with pytest.raises(troupe.AgentExistsError):
                await rt.spawn("bystander")
            with pytest.raises(ValueError, match="agent id"):
                await rt.spawn("")
            with pytest.raises(TypeError):
                await rt.spawn(42)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="empty"):
                await bystander.say("   ")
            with pytest.raises(TypeError):
                await bystander.say(None)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="temperature"):
                await bystander.say("hi", temperature=-1)
            with pytest.raises(troupe.ContextLengthError) as too_long:
                await bystander.say("x" * 3000)
            assert too_long.value.limit == rt.model.context_length
            assert too_long.value.needed > too_long.value.limit
            with pytest.raises(troupe.ContextLengthError):
                await bystander.say("hi", max_tokens=rt.model.context_length)
            with pytest.raises(troupe.ContextLengthError):
                async for _ in bystander.stream("x" * 3000):
                    pass
            # After all that, the bystander answers as it would have anyway.
            again = await (await rt.spawn("bystander-2")).say("Baseline.", max_tokens=6)
            assert again.tokens == expected.tokens

        assert len(long_reply[0].tokens) == 300
        # Refused turns left no trace in the transcript.
        assert [m.content for m in bystander.transcript() if m.role == "user"] == ["Baseline."]


async def test_use_after_close_raises_runtime_closed() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a")
    assert rt.closed
    with pytest.raises(troupe.RuntimeClosedError):
        await a.say("hello")
    with pytest.raises(troupe.RuntimeClosedError):
        await rt.spawn("b")
    with pytest.raises(troupe.RuntimeClosedError):
        await rt.get("a")
    with pytest.raises(troupe.RuntimeClosedError):
        async for _ in a.stream("hello"):
            pass


async def test_a_model_that_is_not_a_local_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(troupe.ModelLoadError, match="never downloads"):
        async with troupe.open_runtime(model="mlx-community/some-model-4bit"):
            pass
    (tmp_path / "empty").mkdir()
    with pytest.raises(troupe.ModelLoadError, match=r"config\.json"):
        async with troupe.open_runtime(model=tmp_path / "empty"):
            pass
    with pytest.raises(ValueError, match="embedded size"):
        async with troupe.open_runtime(model="embedded:huge"):
            pass


async def test_a_store_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "not-a-dir"
    target.write_text("hello")
    with pytest.raises(troupe.StoreError, match="not a directory"):
        async with troupe.open_runtime(model=TINY, store=target):
            pass


async def test_runtime_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        async with troupe.open_runtime(model=TINY, max_batch_size=0):
            pass
    with pytest.raises(ValueError, match="mailbox_size"):
        async with troupe.open_runtime(model=TINY, mailbox_size=0):
            pass


async def test_errors_raised_in_the_block_come_out_as_they_were() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with troupe.open_runtime(model=TINY) as rt:
            await rt.spawn("a")
            raise KeyError("mine")


async def test_a_damaged_model_directory_is_a_model_load_error(
    tmp_path: Path, tiny_model: Path
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(troupe.ModelLoadError, match="could not load"):
        async with troupe.open_runtime(model=damaged):
            pass
    assert not [t for t in threading.enumerate() if t.name == "troupe-mlx"]
