"""``troupe bench``: speed as ratios against a baseline run side by side, same process.

batching  N agents' turns one at a time vs all at once (aggregate decode tokens/s).
reuse     time to first token of a turn on a long context: cold (prefill everything) vs
          warm from the agent's cache in memory vs warm from the store on disk.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import TextIO

import anyio

from troupe import BLAS, Agent, open_runtime


async def first_token_seconds(agent: Agent, text: str, max_tokens: int = 8) -> float:
    """Seconds from sending ``text`` to the reply's first text (greedy)."""
    # The turn runs to its end: a cancelled turn would not be committed to the store.
    started = time.perf_counter()
    first: float | None = None
    async for _ in agent.stream(text, max_tokens=max_tokens):
        if first is None:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


async def run_bench(
    *, model: str, agents: int, max_tokens: int, context: int, out: TextIO = sys.stdout
) -> None:
    """Run both benchmarks and print their figures and ratios."""
    if agents < 1 or max_tokens < 1 or context < 16:
        raise ValueError("need agents >= 1, max_tokens >= 1, context >= 16")
    print(f"troupe bench: model {model!r}, BLAS {BLAS.name}", file=out, flush=True)
    async with open_runtime(model=model) as rt:
        # Warm up MLX's kernels so neither side pays for first use.
        await (await rt.spawn("warmup")).say("warm up", max_tokens=4)
        # Both sides run the same turns (same systems, same greedy replies), so they
        # generate the same tokens; only the batching differs.
        generated: list[int] = []

        async def turn(agent: Agent) -> None:
            reply = await agent.say("Hello there.", max_tokens=max_tokens)
            generated.append(len(reply.tokens))

        crowd = [await rt.spawn(f"seq{i}", system=f"Agent number {i}.") for i in range(agents)]
        started = time.perf_counter()
        for agent in crowd:
            await turn(agent)
        sequential = sum(generated) / (time.perf_counter() - started)

        generated.clear()
        crowd = [await rt.spawn(f"bat{i}", system=f"Agent number {i}.") for i in range(agents)]
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for agent in crowd:
                tg.start_soon(turn, agent)
        batched = sum(generated) / (time.perf_counter() - started)
        print(f"batching  {agents} agents, up to {max_tokens} tokens each: one at a time "
              f"{sequential:.1f} tok/s, batched {batched:.1f} tok/s, "
              f"ratio {batched / sequential:.2f}x (peak batch {rt.statistics().peak_batch_size})",
              file=out, flush=True)

    system = ("The long shared history of the village. " * (context // 40 + 1))[:context]
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as store:
        async with open_runtime(model=model, store=store) as rt:
            await (await rt.spawn("warmup")).say("warm up", max_tokens=4)
            cold_agent = await rt.spawn("cold", system=system)
            cold = await first_token_seconds(cold_agent, "What happened first?")
            warm = await first_token_seconds(cold_agent, "And then?")
        async with open_runtime(model=model, store=store) as rt:
            await (await rt.get("warmup")).say("warm up", max_tokens=4)
            restored = await first_token_seconds(await rt.get("cold"), "And after that?")
    print(f"reuse     {context}-character context, time to first token: cold {cold * 1e3:.0f} ms,"
          f" warm in memory {warm * 1e3:.0f} ms ({cold / warm:.1f}x), restored from disk "
          f"{restored * 1e3:.0f} ms ({cold / restored:.1f}x)", file=out, flush=True)
