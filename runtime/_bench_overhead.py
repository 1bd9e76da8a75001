"""``troupe bench overhead``: what troupe costs over the bare engine, measured in one process.

decode      N agents' greedy turns through troupe vs the same token sequences through a
            bare mlx-lm ``BatchGenerator`` (same model, batch sizes and prefill step), on a
            thread of its own while no runtime is open; rounds alternate (A B A B).
round trips in-process actor calls per second through troupe's actor kernel, on trio and
            on asyncio (each on an event loop of its own, in a thread).
loop lag    lateness of a 1 ms periodic task while agents decode: idle, 16 agents with no
            store, many agents with a store whose small KV budget makes turns restore
            blocks from disk.
itl         inter-token latency of streaming agents, alone and while a long prompt joins
            the batch (mlx-lm prefills it a chunk per decode step).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio
import anyio.to_thread
import attrs
import sniffio
import trio
import trio.lowlevel

from . import BLAS
from ._actor import Actor, Request
from ._bench_tiers import _chars_per_token, _text
from ._records import Message
from ._runtime import Runtime, open_runtime
from .actors._agent import Agent, chat_messages

# troupe's defaults (open_runtime), which the bare side copies.
MAX_BATCH_SIZE = 32
PREFILL_STEP_SIZE = 128
PREFILL_BATCH_SIZE = min(8, MAX_BATCH_SIZE)  # as actors/_mlx/_batch.py Batch sets it

USER = "Tell me about your day in the village."


@attrs.frozen
class Sizes:
    decode_agents: int
    decode_tokens: int
    rounds: int
    calls: int
    callers: int
    trip_repeats: int
    idle_seconds: float
    lag_agents: int
    lag_tokens: int
    restore_agents: int
    restore_context: int
    restore_tokens: int
    itl_agents: int
    itl_tokens: int
    long_prompt: int


FULL = Sizes(decode_agents=16, decode_tokens=64, rounds=3, calls=50_000, callers=16,
             trip_repeats=3, idle_seconds=1.0, lag_agents=16, lag_tokens=64,
             restore_agents=64, restore_context=300, restore_tokens=16,
             itl_agents=8, itl_tokens=64, long_prompt=2000)
QUICK = Sizes(decode_agents=16, decode_tokens=16, rounds=2, calls=4_000, callers=16,
              trip_repeats=2, idle_seconds=0.2, lag_agents=16, lag_tokens=12,
              restore_agents=16, restore_context=150, restore_tokens=4,
              itl_agents=8, itl_tokens=24, long_prompt=600)


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``samples`` (seconds), in milliseconds (nearest rank)."""
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "samples": 0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99), "max_ms": ordered[-1] * 1e3,
            "samples": len(ordered)}


def _ms(figures: dict[str, Any]) -> str:
    text = (f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
            f"max {figures['max_ms']:.1f} ms")
    if "loop_busy_p99_ms" in figures:
        text += (f" (loop busy p99 {figures['loop_busy_p99_ms']:.2f} ms, its wake-ups late "
                 f"p99 {figures['wakeup_overshoot_p99_ms']:.2f} ms)")
    return text


# -- 1. decode: troupe vs a bare BatchGenerator ----------------------------------------------


def _systems(agents: int) -> list[str]:
    # Distinct, and shorter than a KV block: no prompt reuses another's KV.
    return [f"Agent {i}. You are villager number {i} of Millbrook." for i in range(agents)]


@attrs.define
class DecodeRun:
    """One side's run of the same sequences: tokens per sequence, and when they came.

    ``starts``/``ends``: per sequence, (seconds, steps taken so far) at its first token
    and at the one before its last (the step that ends a sequence also hands its cache
    back, which is not decoding), ``steps`` counting the generator's (or troupe's
    engine's) steps. ``finished``: when the last token of all came.
    """

    tokens: list[list[int]]
    submitted: float
    starts: list[tuple[float, int]]
    ends: list[tuple[float, int]]
    finished: float
    prompt_tokens: list[int] = attrs.field(factory=list)
    """troupe's side: the tokens each turn prefilled or reused (its prompt's length)."""

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_rate(self) -> float:
        """Tokens per second while every sequence decodes: from the last sequence's first
        token (all prompts prefilled) to the first sequence's last but one, the batch
        generates one token per sequence per step."""
        (t0, s0), (t1, s1) = max(self.starts), min(self.ends)
        if s1 <= s0 or t1 <= t0:
            # A sequence ended (end of text) before the last one began: no such window;
            # all the tokens from the first to the last, then.
            return self.generated / max(1e-9, max(self.ends)[0] - min(self.starts)[0])
        return len(self.tokens) * (s1 - s0) / (t1 - t0)

    @property
    def overall_rate(self) -> float:
        """Tokens per second from submitting every sequence to the last token."""
        return self.generated / max(1e-9, self.finished - self.submitted)


def _bare_batch(path: str, prompts: list[list[int]], max_tokens: int) -> DecodeRun:
    """The sequences through mlx-lm alone, on the calling thread (which must then end:
    see ``_on_own_thread``). Returns the run measured after a warm-up of the same
    prompts."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(path)

    def greedy(logprobs: mx.array) -> mx.array:
        return mx.argmax(logprobs, axis=-1)

    def run(limit: int) -> DecodeRun:
        generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=MAX_BATCH_SIZE,
            prefill_batch_size=PREFILL_BATCH_SIZE,
            prefill_step_size=PREFILL_STEP_SIZE,
        )
        try:
            submitted = time.perf_counter()
            uids = generator.insert([list(p) for p in prompts], max_tokens=[limit] * len(prompts),
                                    samplers=[greedy] * len(prompts))
            index = {int(uid): i for i, uid in enumerate(uids)}
            tokens: list[list[int]] = [[] for _ in prompts]
            starts: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
            ends: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
            left = len(prompts)
            steps = 0
            while left:
                _, generated = generator.next()
                steps += 1
                now = time.perf_counter()
                for response in generated:
                    i = index[int(response.uid)]
                    if not tokens[i]:
                        starts[i] = (now, steps)
                    tokens[i].append(int(response.token))
                    if response.finish_reason is not None:
                        left -= 1
                    else:
                        ends[i] = (now, steps)
            return DecodeRun(tokens, submitted, starts, ends, time.perf_counter())
        finally:
            generator.close()

    run(min(4, max_tokens))  # warm-up: MLX's kernels for these shapes
    return run(max_tokens)


async def _on_own_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a new thread that ends afterwards (MLX streams are thread-local)."""
    from .actors._mlx import release_thread_resources

    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc
        finally:
            release_thread_resources()

    thread = threading.Thread(target=main, name="troupe-bench-bare", daemon=True)
    thread.start()
    await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=False)
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _render(rt: Runtime, systems: list[str]) -> list[list[int]]:
    """The token ids troupe prefills for each agent's first turn (its own renderer)."""
    renderer = rt._services.renderer
    return [await renderer.render(chat_messages(system, [Message("user", USER)]), len(USER))
            for system in systems]


async def _troupe_batch(rt: Runtime, tag: str, systems: list[str], max_tokens: int) -> DecodeRun:
    """Fresh agents (one per system prompt) take their first turn at once, streamed."""
    agents = [await rt.spawn(f"{tag}-{i}", system=s) for i, s in enumerate(systems)]
    tokens: list[list[int]] = [[] for _ in agents]
    prompts = [0] * len(agents)
    starts: list[tuple[float, int]] = [(0.0, 0)] * len(agents)
    ends: list[tuple[float, int]] = [(0.0, 0)] * len(agents)
    counters = rt._engine.counters  # read on the loop as each token's text arrives

    async def turn(i: int, agent: Agent) -> None:
        stream = agent.stream(USER, max_tokens=max_tokens, temperature=0.0)
        last: tuple[float, int] | None = None
        async for _ in stream:
            if last is None:
                starts[i] = (time.perf_counter(), counters.steps)
            else:
                ends[i] = last  # the text before the last: see DecodeRun
            last = (time.perf_counter(), counters.steps)
        assert stream.reply is not None
        tokens[i] = list(stream.reply.tokens)
        prompts[i] = stream.reply.prompt_tokens + stream.reply.cached_tokens

    submitted = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, agent in enumerate(agents):
            tg.start_soon(turn, i, agent)
    return DecodeRun(tokens, submitted, starts, ends, time.perf_counter(), prompts)


async def _decode(model: str, sizes: Sizes, out: TextIO) -> dict[str, Any]:
    systems = _systems(sizes.decode_agents)
    troupe_runs: list[DecodeRun] = []
    bare_runs: list[DecodeRun] = []
    troupe_steps: list[int] = []
    prompts: list[list[int]] = []
    path = ""
    for round_no in range(sizes.rounds):
        # A: troupe, in a runtime of its own.
        async with open_runtime(model=model, max_batch_size=MAX_BATCH_SIZE,
                                prefill_step_size=PREFILL_STEP_SIZE) as rt:
            path = rt.model.path
            if not prompts:
                prompts = await _render(rt, systems)
            await _troupe_batch(rt, "warm", systems, min(4, sizes.decode_tokens))
            steps = rt.statistics().engine_steps
            troupe_runs.append(await _troupe_batch(rt, f"r{round_no}", systems,
                                                   sizes.decode_tokens))
            troupe_steps.append(rt.statistics().engine_steps - steps)
        # B: the bare generator on a thread of its own, no runtime open.
        bare_runs.append(await _on_own_thread(
            functools.partial(_bare_batch, path, prompts, sizes.decode_tokens)))
    # Identical sequences: the same prompts (lengths checked here, tokens by construction:
    # both sides use the renderer's ids) and then the same greedy tokens.
    prompt_mismatches = sum(
        1 for r in troupe_runs for n, p in zip(r.prompt_tokens, prompts, strict=True)
        if n != len(p)
    )
    differing = sum(
        1 for t in troupe_runs for b in bare_runs for x, y in zip(t.tokens, b.tokens, strict=True)
        if x != y
    )
    tokens_differing = sum(
        sum(1 for p, q in zip(x, y, strict=False) if p != q) + abs(len(x) - len(y))
        for t in troupe_runs for b in bare_runs for x, y in zip(t.tokens, b.tokens, strict=True)
    )
    best_troupe = max(r.decode_rate for r in troupe_runs)
    best_bare = max(r.decode_rate for r in bare_runs)
    best_troupe_all = max(r.overall_rate for r in troupe_runs)
    best_bare_all = max(r.overall_rate for r in bare_runs)
    result = {
        "agents": sizes.decode_agents,
        "max_tokens": sizes.decode_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "tokens_generated": troupe_runs[0].generated,
        "rounds": sizes.rounds,
        "statistic": "best of the rounds, each side",
        "decode_window": "from the last sequence's first token to the first one's last: "
                         "sequences x steps / seconds",
        "troupe_tokens_per_s": best_troupe,
        "bare_tokens_per_s": best_bare,
        "ratio": best_troupe / best_bare,
        "troupe_overall_tokens_per_s": best_troupe_all,
        "bare_overall_tokens_per_s": best_bare_all,
        "overall_ratio": best_troupe_all / best_bare_all,
        "troupe_rounds_tokens_per_s": [r.decode_rate for r in troupe_runs],
        "bare_rounds_tokens_per_s": [r.decode_rate for r in bare_runs],
        "troupe_engine_steps": troupe_steps,
        "bare_steps": [max(r.ends)[1] + 1 for r in bare_runs],
        "prompt_length_mismatches": prompt_mismatches,
        "greedy_sequences_differing": differing,
        "greedy_tokens_differing": tokens_differing,
    }
    _say(out, f"decode       {sizes.decode_agents} agents x {sizes.decode_tokens} tokens, greedy, "
              f"while all decode: troupe {best_troupe:.1f} tok/s, bare BatchGenerator "
              f"{best_bare:.1f} tok/s, ratio {best_troupe / best_bare:.3f} (best of "
              f"{sizes.rounds} alternating rounds each; submit to last token: ratio "
              f"{best_troupe_all / best_bare_all:.3f}); sequences differing: {differing}")
    return result


# -- 2. actor round trips --------------------------------------------------------------------


class _Ping(Request[int]):
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class _Echo(Actor):
    async def handle(self, message: Request[Any]) -> Any:
        assert isinstance(message, _Ping)
        return message.n


async def _trips(calls: int, callers: int) -> float:
    """Calls per second to a trivial actor from ``callers`` tasks (``calls`` in all)."""
    actor = _Echo("echo", 16)
    each = max(1, calls // callers)

    async def caller() -> None:
        for i in range(each):
            await actor.call(_Ping(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.run)
        await actor.call(_Ping(0))
        started = time.perf_counter()
        async with anyio.create_task_group() as crowd:
            for _ in range(callers):
                crowd.start_soon(caller)
        elapsed = time.perf_counter() - started
        actor.stop()
    return each * callers / elapsed


async def _ping_pong(calls: int) -> float:
    """The floor under a call: one task hands a request to another and parks until that
    one answers and parks in turn (two task switches), with the loop's own primitives
    and nothing else (no mailbox bound, no cancellation, no errors)."""
    inbox: deque[Any] = deque()
    if sniffio.current_async_library() == "trio":
        parked: list[trio.lowlevel.Task] = []

        def succeed(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED

        async def server() -> None:
            while True:
                while not inbox:
                    parked.append(trio.lowlevel.current_task())
                    await trio.lowlevel.wait_task_rescheduled(succeed)
                caller = inbox.popleft()
                if caller is None:
                    return
                trio.lowlevel.reschedule(caller)

        async def call() -> None:
            inbox.append(trio.lowlevel.current_task())
            if parked:
                trio.lowlevel.reschedule(parked.pop())
            await trio.lowlevel.wait_task_rescheduled(succeed)

        def end() -> None:
            inbox.append(None)
            if parked:
                trio.lowlevel.reschedule(parked.pop())
    else:
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []

        async def server() -> None:
            while True:
                while not inbox:
                    waiting.append(loop.create_future())
                    await waiting[-1]
                answer = inbox.popleft()
                if answer is None:
                    return
                answer.set_result(None)

        async def call() -> None:
            answer = loop.create_future()
            inbox.append(answer)
            if waiting:
                waiting.pop().set_result(None)
            await answer

        def end() -> None:
            inbox.append(None)
            if waiting:
                waiting.pop().set_result(None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        await call()
        started = time.perf_counter()
        for _ in range(calls):
            await call()
        elapsed = time.perf_counter() - started
        end()
    return calls / elapsed


KINDS = ("sequential", "concurrent", "ping_pong")


def _trips_on(backend: str, sizes: Sizes) -> dict[str, list[float]]:
    async def main() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(sizes.trip_repeats):
            rates["ping_pong"].append(await _ping_pong(sizes.calls))
            rates["sequential"].append(await _trips(sizes.calls, 1))
            rates["concurrent"].append(await _trips(sizes.calls, sizes.callers))
        return rates

    result: dict[str, list[float]] = anyio.run(main, backend=backend)
    return result


async def _round_trips(sizes: Sizes, out: TextIO) -> dict[str, Any]:
    repeats = 2 * sizes.trip_repeats
    result: dict[str, Any] = {"calls": sizes.calls, "callers": sizes.callers,
                              "statistic": f"best of {repeats}"}
    runs: dict[str, dict[str, list[float]]] = {
        backend: {kind: [] for kind in KINDS} for backend in ("trio", "asyncio")}
    # Each loop in a thread of its own; alternated, so that both see the same machine.
    for _ in range(2):
        for backend in ("trio", "asyncio"):
            rates = await anyio.to_thread.run_sync(functools.partial(_trips_on, backend, sizes))
            for kind, values in rates.items():
                runs[backend][kind].extend(values)
    lines = []
    for backend, kinds in runs.items():
        for kind, values in kinds.items():
            result[f"{backend}_{kind}_per_s"] = max(values)
        sequential = result[f"{backend}_sequential_per_s"]
        floor = result[f"{backend}_ping_pong_per_s"]
        result[f"{backend}_sequential_vs_ping_pong"] = sequential / floor
        lines.append(f"{backend} {sequential / 1e3:.0f}k sequential ({sequential / floor:.2f} of "
                     f"a bare ping-pong's {floor / 1e3:.0f}k), "
                     f"{result[f'{backend}_concurrent_per_s'] / 1e3:.0f}k from "
                     f"{sizes.callers} callers")
    _say(out, f"round trips  in-process actor calls/s (best of {repeats}): "
              + "\n             ".join(lines))
    return result


# -- 3. event-loop lag -----------------------------------------------------------------------


class _LoopWatch(trio.abc.Instrument):
    """trio only: where a late tick's time went. ``busy``: each stretch the loop ran
    tasks and callbacks between two waits for I/O (troupe's own work on the loop);
    ``overshoot``: how long after its timeout each wait that timed out came back (the
    OS waking the loop's thread, or the GIL held by another thread)."""

    def __init__(self) -> None:
        self.busy: list[float] = []
        self.overshoot: list[float] = []
        self._woke: float | None = None
        self._waiting = (0.0, 0.0)

    def before_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        if self._woke is not None:
            self.busy.append(now - self._woke)
        self._waiting = (now, timeout)

    def after_io_wait(self, timeout: float) -> None:
        now = self._woke = time.perf_counter()
        started, limit = self._waiting
        if now - started >= limit:
            self.overshoot.append(now - started - limit)


@attrs.define
class Lag:
    ticks: list[float] = attrs.field(factory=list)
    watch: _LoopWatch | None = None

    def figures(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(_percentiles(self.ticks))
        if self.watch is not None:
            busy, late = _percentiles(self.watch.busy), _percentiles(self.watch.overshoot)
            result.update(loop_busy_p99_ms=busy["p99_ms"], loop_busy_max_ms=busy["max_ms"],
                          wakeup_overshoot_p99_ms=late["p99_ms"],
                          wakeup_overshoot_max_ms=late["max_ms"])
        return result


@asynccontextmanager
async def _lag_probe(period: float = 0.001) -> AsyncIterator[Lag]:
    """Lateness of a ``period`` periodic task on this loop, for the block's duration."""
    lag = Lag()
    on_trio = sniffio.current_async_library() == "trio"
    if on_trio:
        lag.watch = _LoopWatch()
        trio.lowlevel.add_instrument(lag.watch)
    try:
        async with anyio.create_task_group() as tg:

            async def tick() -> None:
                while True:
                    expected = time.perf_counter() + period
                    await anyio.sleep(period)
                    lag.ticks.append(max(0.0, time.perf_counter() - expected))

            tg.start_soon(tick)
            try:
                yield lag
            finally:
                tg.cancel_scope.cancel()
    finally:
        if lag.watch is not None:
            trio.lowlevel.remove_instrument(lag.watch)


async def _turns(agents: list[Agent], text: str, max_tokens: int) -> int:
    generated = 0

    async def one(agent: Agent) -> None:
        nonlocal generated
        reply = await agent.say(text, max_tokens=max_tokens, temperature=0.0)
        generated += len(reply.tokens)

    async with anyio.create_task_group() as tg:
        for agent in agents:
            tg.start_soon(one, agent)
    return generated


async def _loop_lag(model: str, sizes: Sizes, out: TextIO) -> dict[str, Any]:
    result: dict[str, Any] = {"period_ms": 1.0}
    async with _lag_probe() as lag:
        await anyio.sleep(sizes.idle_seconds)
    result["idle"] = lag.figures()

    # (a) agents decoding, no store.
    async with open_runtime(model=model) as rt:
        warm = [await rt.spawn(f"warm-{i}", system=s)
                for i, s in enumerate(_systems(sizes.lag_agents))]
        await _turns(warm, USER, 4)
        crowd = [await rt.spawn(f"lag-{i}", system=s)
                 for i, s in enumerate(_systems(sizes.lag_agents))]
        async with _lag_probe() as lag:
            generated = await _turns(crowd, USER, sizes.lag_tokens)
        result["decode"] = {"agents": sizes.lag_agents, "tokens": generated, **lag.figures()}

    # (b) many agents with a store and a small budget: the second round restores from disk.
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as store:
        async with open_runtime(model=model, store=store, kv_budget=1 << 30) as probe_rt:
            per_token = probe_rt.model.kv_bytes_per_token
            ratio = await _chars_per_token(probe_rt)
        # The budget holds an eighth of the agents' KV (at most 8 MB): most is evicted.
        budget = max(1, min(8_000_000, per_token * sizes.restore_context
                            * sizes.restore_agents // 8))
        async with open_runtime(model=model, store=store, kv_budget=budget) as rt:
            crowd = [await rt.spawn(f"villager-{i}",
                                    system=_text(sizes.restore_context, f"Villager {i}.", ratio))
                     for i in range(sizes.restore_agents)]
            await _turns(crowd, "Good morning.", sizes.restore_tokens)
            before = rt.statistics()
            async with _lag_probe() as lag:
                generated = await _turns(crowd, "What happened next?", sizes.restore_tokens)
            after = rt.statistics()
        contexts = [a.statistics().cached_tokens for a in crowd]
        result["restore"] = {
            "agents": sizes.restore_agents, "tokens": generated,
            "context_tokens": min(contexts), "kv_budget": budget,
            "restores": after.restores - before.restores,
            "evictions": after.evictions, **lag.figures(),
        }
    idle, decode, restore = result["idle"], result["decode"], result["restore"]
    _say(out, f"loop lag     1 ms ticker lateness: idle {_ms(idle)}\n"
              f"             {decode['agents']} agents decoding, no store: {_ms(decode)}\n"
              f"             {restore['agents']} agents with ~{restore['context_tokens']}-token "
              f"contexts, store, budget {budget / 1e6:.1f} MB, {restore['restores']} blocks "
              f"restored during the round: {_ms(restore)}")
    return result


# -- 4. inter-token latency with a long prompt joining --------------------------------------


async def _stream_all(
    agents: list[Agent], max_tokens: int, started: anyio.Event | None, after: int
) -> list[list[float]]:
    """Each agent's text-delta timestamps; ``started`` is set once every agent has
    ``after`` deltas."""
    stamps: list[list[float]] = [[] for _ in agents]
    ready = 0

    async def one(i: int, agent: Agent) -> None:
        nonlocal ready
        async for _ in agent.stream(USER, max_tokens=max_tokens, temperature=0.0):
            stamps[i].append(time.perf_counter())
            if len(stamps[i]) == after:
                ready += 1
                if started is not None and ready == len(agents):
                    started.set()

    async with anyio.create_task_group() as tg:
        for i, agent in enumerate(agents):
            tg.start_soon(one, i, agent)
    return stamps


def _gaps(stamps: list[list[float]], window: tuple[float, float] | None = None) -> list[float]:
    gaps = []
    for row in stamps:
        for a, b in itertools.pairwise(row):
            if window is None or window[0] <= b <= window[1]:
                gaps.append(b - a)
    return gaps


async def _itl(model: str, sizes: Sizes, out: TextIO) -> dict[str, Any]:
    async with open_runtime(model=model, prefill_step_size=PREFILL_STEP_SIZE) as rt:
        long_tokens = min(sizes.long_prompt, rt.model.context_length - 200)
        ratio = await _chars_per_token(rt)
        systems = _systems(sizes.itl_agents)
        warm = [await rt.spawn(f"warm-{i}", system=s) for i, s in enumerate(systems)]
        await _turns(warm, USER, 4)
        alone = [await rt.spawn(f"alone-{i}", system=s) for i, s in enumerate(systems)]
        alone_stamps = await _stream_all(alone, sizes.itl_tokens, None, 0)

        joined = [await rt.spawn(f"joined-{i}", system=s) for i, s in enumerate(systems)]
        reader = await rt.spawn("reader")
        text = _text(long_tokens, "Read this.", ratio)
        started = anyio.Event()
        prefill: dict[str, float] = {}

        async def long_turn() -> None:
            await started.wait()
            prefill["steps_before"] = rt.statistics().engine_steps
            prefill["start"] = time.perf_counter()
            stream = reader.stream(text, max_tokens=2, temperature=0.0)
            async for _ in stream:
                if "first" not in prefill:
                    prefill["first"] = time.perf_counter()
                    prefill["steps_after"] = rt.statistics().engine_steps
            assert stream.reply is not None
            prefill["prompt_tokens"] = stream.reply.prompt_tokens
            prefill.setdefault("first", time.perf_counter())
            prefill.setdefault("steps_after", rt.statistics().engine_steps)

        stamps: list[list[float]] = []

        async def streams() -> None:
            stamps.extend(await _stream_all(joined, sizes.itl_tokens, started, 4))

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_turn)
            tg.start_soon(streams)
    window = (prefill["start"], prefill["first"])
    during = _gaps(stamps, window)
    steps = int(prefill["steps_after"] - prefill["steps_before"])
    chunks = math.ceil(prefill["prompt_tokens"] / PREFILL_STEP_SIZE)
    result: dict[str, Any] = {
        "agents": sizes.itl_agents,
        "max_tokens": sizes.itl_tokens,
        "alone": _percentiles(_gaps(alone_stamps)),
        "joined": _percentiles(_gaps(stamps)),
        "during_prefill": _percentiles(during),
        "long_prompt_tokens": int(prefill["prompt_tokens"]),
        "prefill_seconds": window[1] - window[0],
        "prefill_engine_steps": steps,
        "prefill_chunks": chunks,
        "prefill_step_size": PREFILL_STEP_SIZE,
        "deltas_during_prefill": len(during),
    }
    _say(out, f"itl          {sizes.itl_agents} agents streaming: alone {_ms(result['alone'])}\n"
              f"             with a {result['long_prompt_tokens']}-token prompt joining: "
              f"{_ms(result['joined'])}; during its prefill ({window[1] - window[0]:.2f} s, "
              f"{steps} engine steps for {chunks} chunks of {PREFILL_STEP_SIZE}): "
              f"{_ms(result['during_prefill'])}, {len(during)} deltas")
    return result


# -- all of it -------------------------------------------------------------------------------


async def bench_overhead(
    *, model: str, quick: bool, json_path: str | None, out: TextIO = sys.stdout
) -> None:
    """Measure troupe's overheads and print them (and write them as JSON to ``json_path``)."""
    sizes = QUICK if quick else FULL
    _say(out, f"troupe bench overhead: model {model!r}, BLAS {BLAS.name}"
              f"{' (quick)' if quick else ''}")
    started = time.perf_counter()
    results: dict[str, Any] = {"model": model, "blas": BLAS.name, "quick": quick}
    results["decode"] = await _decode(model, sizes, out)
    results["round_trips"] = await _round_trips(sizes, out)
    results["loop_lag"] = await _loop_lag(model, sizes, out)
    results["itl"] = await _itl(model, sizes, out)
    results["seconds"] = time.perf_counter() - started
    if json_path is not None:
        await anyio.Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
