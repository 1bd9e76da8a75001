"""``troupe bench ttft|bytes|scale``: what the KV blocks and the storage tiers buy.

ttft   time to first token at 1K, 2K and ~4K tokens of context: cold (prefill it all) vs
       hot (the agent's blocks in memory) vs restored from the store's disk, as speedups.
bytes  bytes the store writes over a 50-turn conversation, against the whole-cache-per-turn
       design troupe had before (each turn rewrote every token its cache covered).
scale  many agents with their own >=1K-token contexts (a shared world prompt, then each
       agent's persona) taking turns through a small memory budget with a store.

Each prints its figures and the ratios measured side by side in one process.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import anyio

from troupe import BLAS, Agent, Runtime, open_runtime

from .batching import first_token_seconds

WORLD = (
    "The village of Millbrook sits by a slow river between two hills. Its market opens at "
    "dawn, its bridge is closed for repairs, and a storm is coming from the west. "
)


async def chars_per_token(rt: Runtime) -> float:
    """How many characters of WORLD-like prose make one token under this tokenizer."""
    probe = await rt.spawn("probe-tokenizer", system=WORLD * 8)
    bare = await rt.spawn("probe-bare")
    with_text = (await probe.say("Hi", max_tokens=1)).prompt_tokens
    without = (await bare.say("Hi", max_tokens=1)).prompt_tokens
    return len(WORLD * 8) / max(1, with_text - without)


def world_text(tokens: int, salt: str, ratio: float) -> str:
    """About ``tokens`` tokens of prose starting with ``salt`` (so contexts do not share),
    ``ratio`` being what ``chars_per_token`` measured."""
    chars = int(tokens * ratio)
    return (salt + " " + WORLD * (chars // len(WORLD) + 2))[:chars]


async def bench_ttft(*, model: str, out: TextIO = sys.stdout) -> None:
    """Time to first token, cold vs hot vs restored from disk, at 1K-4K tokens of context."""
    print(f"troupe bench ttft: model {model!r}, BLAS {BLAS.name}", file=out, flush=True)
    # The hot and the restored turn send the same message, so they prefill as many new
    # tokens (the reply's last token and the message): their difference is the restore.
    again = "And then?"
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as store:
        rows: list[tuple[int, float, float, float, int, int]] = []
        async with open_runtime(model=model, store=store) as rt:
            limit = rt.model.context_length
            sizes = [s for s in (1024, 2048, 4096) if s < limit] + (
                [limit - 200] if limit - 200 > 2048 and limit <= 4096 else [])
            await (await rt.spawn("warmup")).say("warm up", max_tokens=4)
            ratio = await chars_per_token(rt)
            agents = {}
            for size in sizes:
                agent = await rt.spawn(f"ctx{size}",
                                       system=world_text(size, f"Agent {size}.", ratio))
                cold = await first_token_seconds(agent, "What happened first?", 2)
                before = agent.statistics().tokens_prefilled
                hot = await first_token_seconds(agent, again, 2)
                stats = agent.statistics()
                agents[size] = (cold, hot, stats.cached_tokens, stats.tokens_prefilled - before)
        async with open_runtime(model=model, store=store) as rt:
            await (await rt.get("warmup")).say("warm up again", max_tokens=4)
            for size, (cold, hot, tokens, hot_new) in agents.items():
                agent = await rt.get(f"ctx{size}")
                disk = await first_token_seconds(agent, again, 2)
                rows.append((tokens, cold, hot, disk, hot_new,
                             agent.statistics().tokens_prefilled))
            restores = rt.statistics().restores
    for tokens, cold, hot, disk, hot_new, disk_new in rows:
        print(f"  {tokens:>5} tokens of context: cold {cold * 1e3:7.0f} ms, hot "
              f"{hot * 1e3:5.0f} ms ({cold / hot:5.1f}x), restored from disk "
              f"{disk * 1e3:5.0f} ms ({cold / disk:5.1f}x); new tokens prefilled hot "
              f"{hot_new}, restored {disk_new}", file=out, flush=True)
    print(f"  ({restores} blocks and tails restored from disk)", file=out, flush=True)


async def bench_bytes(*, model: str, turns: int = 50, out: TextIO = sys.stdout) -> None:
    """Bytes the store writes over a ``turns``-turn conversation vs a whole file per turn."""
    print(f"troupe bench bytes: model {model!r}, {turns}-turn conversation", file=out,
          flush=True)
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as store:
        async with open_runtime(model=model, store=store) as rt:
            per_token = rt.model.kv_bytes_per_token
            agent = await rt.spawn("talker", system=world_text(200, "You talk a lot.",
                                                               await chars_per_token(rt)))
            whole_file = 0
            for i in range(turns):
                await agent.say(f"Tell me about day {i}.", max_tokens=24, temperature=0.0)
                # The previous design rewrote the agent's whole cache file every turn.
                whole_file += agent.statistics().cached_tokens * per_token
            written = rt.statistics().store_bytes_written
            covered = agent.statistics().cached_tokens
    print(f"  context at the end {covered} tokens ({per_token} bytes of KV each)\n"
          f"  blocks written     {written / 1e6:8.1f} MB\n"
          f"  whole-file design  {whole_file / 1e6:8.1f} MB (computed: each turn's cache "
          f"size)\n  ratio              {whole_file / written:8.1f}x less written",
          file=out, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _resident_mb() -> float | None:
    """The process's resident memory now (Linux), or None where /proc has no statm."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)  # as the peak: MiB


async def bench_scale(
    *, model: str, agents: int, turns: int, budget: str, max_tokens: int, batch: int,
    out: TextIO = sys.stdout,
) -> None:
    """``agents`` agents with >=1K-token contexts taking ``turns`` turns each at once through
    a ``budget`` of KV memory with a store: throughput, the tiers' traffic, memory."""
    print(f"troupe bench scale: {agents} agents x {turns} turns, model {model!r}, "
          f"budget {budget}, batch {batch}, BLAS {BLAS.name}", file=out, flush=True)
    rss_before = _peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as store:
        async with open_runtime(model=model, store=store, kv_budget=budget,
                                max_batch_size=batch) as rt:
            model_mb = Path(rt.model.path).joinpath("model.safetensors").stat().st_size / 1e6
            world = world_text(1000, "The world.", await chars_per_token(rt))
            crowd = [await rt.spawn(f"v{i}", system=f"{world} You are villager {i}.")
                     for i in range(agents)]
            started = time.perf_counter()
            generated = 0

            async def speak(agent: Agent, text: str) -> None:
                nonlocal generated
                reply = await agent.say(text, max_tokens=max_tokens, temperature=0.0)
                generated += len(reply.tokens)

            for round_no in range(turns):
                async with anyio.create_task_group() as tg:
                    for agent in crowd:
                        tg.start_soon(speak, agent, f"Round {round_no}: what now?")
                stats = rt.statistics()
                print(f"  round {round_no + 1}: {stats.turns_completed} turns, hot "
                      f"{stats.kv_hot_bytes / 1e6:.1f} MB, {stats.blocks_on_disk} blocks on "
                      f"disk, {stats.restores} restored", file=out, flush=True)
            elapsed = time.perf_counter() - started
            stats = rt.statistics()
            contexts = [a.statistics().cached_tokens for a in crowd]
            # An idle engine hands the memory turns freed back to the OS: wait until it did.
            settled = rt.idle_trim_seconds + 1.0
            await anyio.sleep(settled)
            idle = _resident_mb()
    peak = _peak_rss_mb()
    budget_mb = stats.kv_budget / 1e6
    print(f"  contexts           {min(contexts)}-{max(contexts)} tokens per agent\n"
          f"  wall time          {elapsed:.1f}s, {generated / elapsed:.1f} tok/s generated\n"
          f"  tokens prefilled   {stats.tokens_prefilled}, reused {stats.tokens_reused}\n"
          f"  restores           {stats.restores} blocks, rebuilds {stats.rebuilds}, "
          f"evictions {stats.evictions}\n"
          f"  store              {stats.store_bytes_written / 1e6:.1f} MB written, "
          f"{stats.store_bytes_read / 1e6:.1f} MB read\n"
          f"  peak RSS           {peak:.0f} MB (before opening: {rss_before:.0f} MB; model "
          f"{model_mb:.0f} MB + budget {budget_mb:.0f} MB + 300 MB = "
          f"{model_mb + budget_mb + 300:.0f} MB)\n"
          f"  RSS when idle      "
          f"{'unknown' if idle is None else f'{idle:.0f} MB'} (the runtime still open, "
          f"{settled:.0f} s after the last turn)", file=out, flush=True)
