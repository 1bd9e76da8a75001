"""``troupe bench structured``: constrained decoding inside the batch, as ratios in one run.

decode    16 agents in one batch, half with a JSON schema of 10 fields and half free,
          against the same 16 all free (the same prompts; the first half's free turns
          stop at the lengths of its constrained replies, so both batches step the same
          rows the same number of steps): per-agent decode tokens/s of the free half and
          of the constrained half, each over the all-free batch's; which kind of round
          runs first alternates.
compile   a schema new to the runtime (compiled against the tokenizer) against the same
          schema again (copied from troupe's cache), timed as a one-token turn each.
sim       agents that each round pick one of 5 actions with ``choices=`` and then say a
          sentence: rounds/s, against the same sim picking in free text.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import attrs
import trio

from troupe import IncompleteReplyError, Runtime, open_runtime

SYSTEM = "You are a villager. Answer briefly."
ACTIONS = ["farm", "trade", "rest", "travel", "fight"]


@attrs.frozen
class Sizes:
    decode_agents: int
    decode_tokens: int
    rounds: int
    compile_schemas: int
    sim_agents: int
    sim_rounds: int


FULL = Sizes(16, 160, 2, 16, 100, 3)
QUICK = Sizes(16, 160, 1, 6, 24, 2)


def ten_fields(tag: str = "") -> dict[str, Any]:
    """A JSON Schema of 10 bounded fields (about 80-110 characters of JSON)."""
    props: dict[str, Any] = {}
    for i in range(10):
        name = f"{tag}f{i}"
        props[name] = ({"type": "integer", "minimum": 0, "maximum": 999} if i % 3 == 0
                       else {"type": "boolean"} if i % 3 == 1
                       else {"type": "string", "maxLength": 6})
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


async def _round(rt: Runtime, tag: str, n: int, tokens: list[int], constrained: int,
                 ) -> tuple[dict[int, float], dict[int, int], float]:
    agents = [await rt.spawn(f"{tag}-{i}", system=SYSTEM) for i in range(n)]
    ended: dict[int, float] = {}
    made: dict[int, int] = {}
    start = time.perf_counter()

    async def one(i: int) -> None:
        schema = ten_fields() if i < constrained else None
        reply = await agents[i].say(f"Report {i}.", schema=schema, max_tokens=tokens[i])
        ended[i], made[i] = time.perf_counter() - start, len(reply.tokens)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return ended, made, time.perf_counter() - start


def _rate(ended: dict[int, float], made: dict[int, int], group: range) -> float:
    """Per-agent decode tokens/s of ``group``: its tokens over the time its last turn
    took, per agent."""
    return sum(made[i] for i in group) / max(ended[i] for i in group) / len(group)


async def bench_decode(rt: Runtime, sizes: Sizes) -> dict[str, float]:
    n, half = sizes.decode_agents, sizes.decode_agents // 2
    free_half, constrained_half = range(half, n), range(half)
    # (The first half: constrained in the mixed round, free in the all-free one.)
    # The warm-up (compile, kernels, prompt blocks) also says how long each constrained
    # reply is (greedy: the same each round); the all-free round's first half stops there,
    # so both rounds step the same rows for the same number of steps.
    _, lengths, _ = await _round(rt, "warm", n, [sizes.decode_tokens] * n, half)
    tokens = [lengths[i] if i < half else sizes.decode_tokens for i in range(n)]
    mixed_free: list[float] = []
    mixed_con: list[float] = []
    all_free_f: list[float] = []
    all_free_c: list[float] = []
    mask_before = rt.statistics().mask_seconds
    constrained_tokens = 0
    for r in range(sizes.rounds):
        # The order alternates, so that drift over the run (a growing pool, the heap)
        # weighs on both kinds of round alike.
        for kind in ("free", "mixed") if r % 2 == 0 else ("mixed", "free"):
            ended, made, _ = await _round(rt, f"{kind}{r}", n, tokens,
                                          half if kind == "mixed" else 0)
            if kind == "free":
                all_free_f.append(_rate(ended, made, free_half))
                all_free_c.append(_rate(ended, made, constrained_half))
            else:
                mixed_free.append(_rate(ended, made, free_half))
                mixed_con.append(_rate(ended, made, constrained_half))
                constrained_tokens += sum(made[i] for i in constrained_half)
    mask = rt.statistics().mask_seconds - mask_before
    return {
        "free_half_ratio": sum(mixed_free) / sum(all_free_f),
        "constrained_half_ratio": sum(mixed_con) / sum(all_free_c),
        "all_free_tokens_per_s_per_agent": sum(all_free_f) / len(all_free_f),
        "mixed_free_tokens_per_s_per_agent": sum(mixed_free) / len(mixed_free),
        "mixed_constrained_tokens_per_s_per_agent": sum(mixed_con) / len(mixed_con),
        "mask_us_per_constrained_token": 1e6 * mask / max(1, constrained_tokens),
    }


async def bench_compile(rt: Runtime, sizes: Sizes) -> dict[str, float]:
    first: list[float] = []
    cached: list[float] = []

    async def timed(agent_id: str, schema: dict[str, Any]) -> float:
        agent = await rt.spawn(agent_id, system=SYSTEM)
        start = time.perf_counter()
        with contextlib.suppress(IncompleteReplyError):
            await agent.say("Go.", schema=schema, max_tokens=1)
        return time.perf_counter() - start

    compiled = rt.statistics().grammars_compiled
    for i in range(sizes.compile_schemas):
        schema = ten_fields(f"s{i}_")
        first.append(await timed(f"compile-a{i}", schema))
        cached.append(await timed(f"compile-b{i}", schema))
    assert rt.statistics().grammars_compiled - compiled == sizes.compile_schemas
    return {"first_ms": 1e3 * sum(first) / len(first),
            "cached_ms": 1e3 * sum(cached) / len(cached),
            "first_over_cached": sum(first) / sum(cached)}


async def bench_sim(rt: Runtime, sizes: Sizes, *, constrained: bool) -> float:
    tag = "sim-c" if constrained else "sim-f"
    agents = [await rt.spawn(f"{tag}{i}", system=SYSTEM) for i in range(sizes.sim_agents)]

    async def turn(i: int, r: int) -> None:
        agent = agents[i]
        question = f"Round {r}: pick one of {', '.join(ACTIONS)}."
        if constrained:
            await agent.say(question, choices=ACTIONS, max_tokens=8)
        else:
            await agent.say(question, max_tokens=4)
        await agent.say("Say why, in one sentence.", max_tokens=16, stop=".")

    start = time.perf_counter()
    for r in range(sizes.sim_rounds):
        async with trio.open_nursery() as nursery:
            for i in range(len(agents)):
                nursery.start_soon(turn, i, r)
    return sizes.sim_rounds / (time.perf_counter() - start)


async def bench_structured(*, model: str, quick: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    print(f"troupe bench structured{' --quick' if quick else ''}: model {model}, {sizes}")
    async with open_runtime(model=model, max_batch_size=32) as rt:
        decode = await bench_decode(rt, sizes)
        print(f"decode   {sizes.decode_agents} agents, half with a 10-field schema: "
              f"free half {decode['free_half_ratio']:.2f}x and constrained half "
              f"{decode['constrained_half_ratio']:.2f}x of all-free "
              f"({decode['all_free_tokens_per_s_per_agent']:.1f} tok/s per agent); "
              f"mask {decode['mask_us_per_constrained_token']:.0f} us per constrained token")
        compiled = await bench_compile(rt, sizes)
        print(f"compile  a new 10-field schema {compiled['first_ms']:.1f} ms per one-token "
              f"turn, from the cache {compiled['cached_ms']:.1f} ms "
              f"({compiled['first_over_cached']:.2f}x)")
        # Alternate the two sims (free, choices, free, choices) on fresh agents.
        free_rate = await bench_sim(rt, sizes, constrained=False)
        choice_rate = await bench_sim(rt, sizes, constrained=True)
        print(f"sim      {sizes.sim_agents} agents x {sizes.sim_rounds} rounds: choices= "
              f"{choice_rate:.3f} rounds/s, free text {free_rate:.3f} rounds/s "
              f"({choice_rate / free_rate:.2f}x)")
        stats = rt.statistics()
        print(f"grammars compiled {stats.grammars_compiled}, reused {stats.grammars_reused}; "
              f"mask time {stats.mask_seconds:.2f} s of {stats.decode_seconds:.2f} s decoding")
    return {"decode": decode, "compile": compiled,
            "sim": {"choices_rounds_per_s": choice_rate, "free_rounds_per_s": free_rate}}
