"""``troupe demo``: a small village of agents talking in a ring, round after round."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

import anyio
import cattrs

from . import BLAS
from ._records import Reply
from ._runtime import open_runtime

WORLD = (
    "The village of Millbrook sits by a river. It is market day, a storm is coming, and "
    "the bridge to the next town is closed for repairs. Speak in one or two sentences."
)

PEOPLE = [
    ("alice", "Alice, the baker, who worries about flour running out"),
    ("bob", "Bob, the blacksmith, who is repairing the bridge"),
    ("carol", "Carol, the innkeeper, who hears every rumour"),
    ("dave", "Dave, the fisherman, who reads the weather"),
    ("erin", "Erin, the mayor, who must decide whether to close the market"),
    ("frank", "Frank, a traveller stuck in town by the closed bridge"),
    ("grace", "Grace, the healer, who tends the sick"),
    ("heidi", "Heidi, the miller, who owns the only grain store"),
]


def _people(count: int) -> list[tuple[str, str]]:
    return [
        PEOPLE[i] if i < len(PEOPLE) else (f"villager{i}", f"Villager {i}, a resident")
        for i in range(count)
    ]


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


async def run_demo(
    *,
    agents: int,
    turns: int,
    model: str,
    store: str | None,
    max_tokens: int,
    temperature: float,
    seed: int,
    json_path: str | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Run the simulation and print progress and a summary to ``out``.

    With ``json_path``, the final statistics are also written there as JSON.
    """
    if agents < 2:
        raise ValueError("the demo needs at least 2 agents")
    if turns < 1:
        raise ValueError("turns must be >= 1")
    started = time.perf_counter()
    print(f"troupe demo: {agents} agents x {turns} rounds, model {model!r}, "
          f"store {store or '(memory)'}, BLAS {BLAS.name}", file=out, flush=True)
    async with open_runtime(model=model, store=store) as rt:
        loaded = time.perf_counter()
        print(f"model ready in {loaded - started:.1f}s: {rt.model.name} "
              f"(context {rt.model.context_length} tokens)", file=out, flush=True)
        people = _people(agents)
        handles = []
        for agent_id, persona in people:
            if agent_id in rt.agent_ids():
                handles.append(await rt.get(agent_id))
            else:
                handles.append(await rt.spawn(agent_id, system=f"{WORLD} You are {persona}."))
        if any(h.transcript() for h in handles):
            print("continuing the conversation from the store", file=out, flush=True)
        # Each round every agent answers what its left neighbour said last round,
        # all at once: the scheduler batches the turns together.
        heard = ["The first raindrops fall on the market square. What do you do?"] * agents
        turn_base = max(h.statistics().turns for h in handles)
        total_turns = agents * turns
        done = 0
        for round_no in range(turns):
            replies: list[Reply | None] = [None] * agents

            async def speak(
                i: int, message: str, round_no: int = round_no,
                replies: list[Reply | None] = replies,
            ) -> None:
                nonlocal done
                reply = await handles[i].say(
                    message, max_tokens=max_tokens, temperature=temperature,
                    # Wrapped into [0, 2**63), the range of seeds, whatever the base.
                    seed=(seed + 1000 * (turn_base + round_no) + i) % 2**63,
                )
                replies[i] = reply
                done += 1
                listener = people[(i + 1) % agents][0]
                label = f"round {turn_base + round_no + 1}"
                print(
                    f"[{done:>3}/{total_turns}] {label} {people[i][0]:>8} -> "
                    f"{listener:<8} {len(reply.tokens):>3} tok, prefill {reply.prompt_tokens:>4}"
                    f", reused {reply.cached_tokens:>5} | {_clip(reply.text, 40)}",
                    file=out, flush=True,
                )

            async with anyio.create_task_group() as tg:
                for i in range(agents):
                    tg.start_soon(speak, i, heard[i])
            heard = [
                f"{people[(i - 1) % agents][0].title()} says: "
                f"{_clip(replies[(i - 1) % agents].text, 200) or '...'}"  # type: ignore[union-attr]
                for i in range(agents)
            ]
        stats = rt.statistics()
    elapsed = time.perf_counter() - loaded
    reused_share = stats.tokens_reused / max(1, stats.tokens_reused + stats.tokens_prefilled)
    print(
        "\nsummary\n"
        f"  agents             {stats.agents}\n"
        f"  turns              {stats.turns_completed}\n"
        f"  tokens generated   {stats.tokens_generated}\n"
        f"  wall time          {elapsed:.1f}s (after the model loaded)\n"
        f"  aggregate tok/s    {stats.tokens_generated / elapsed:.1f}\n"
        f"  tokens prefilled   {stats.tokens_prefilled}\n"
        f"  tokens from cache  {stats.tokens_reused} ({reused_share:.0%} of prompt tokens)\n"
        f"  peak batch size    {stats.peak_batch_size}\n"
        f"  caches saved       {stats.caches_saved}, restored {stats.caches_loaded}",
        file=out, flush=True,
    )
    if model.startswith("embedded"):
        print("  (the embedded model has random weights: its text is noise by design)",
              file=out, flush=True)
    if store:
        print(f"  store: {store} (run again to continue)", file=out, flush=True)
    if json_path:
        report = {"statistics": cattrs.unstructure(stats), "wall_seconds": elapsed,
                  "model": rt.model.name, "blas": BLAS.name}
        await anyio.Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
