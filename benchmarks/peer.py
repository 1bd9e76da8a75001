"""``troupe bench peer``: multi-agent workloads on troupe and on ``mlx_lm.server``.

Both systems run the same turns on the same model directory and the same BLAS, greedy,
with the same concurrency: troupe in this process (with a store), the server as a
subprocess driven through its OpenAI API by concurrent clients that keep each agent's
conversation and send it whole every turn, as its users' clients do. The server gets a
prompt cache sized to the workload (and the same byte budget where one applies) and
troupe's prefill chunk size. Model load is outside every timing; each system is warmed up.

village       agents share a long world prompt, then each has its own persona; rounds in
              which every agent answers a message at once.
crowd         many agents with long contexts (a shared world prompt, then a private
              history) through a KV budget far smaller than their caches. troupe builds
              the contexts in a setup turn each (reported, not timed); the server's clients
              start from the same conversations (its cache could not have kept them through
              the budget), and then both run the timed rounds.
restart       the village, stopped after half its rounds and resumed: troupe reopens its
              store, the server process restarts. The resumed half is timed.
orchestrator  a coordinator plans a task, workers (sharing one long prompt) answer their
              parts at once, the coordinator gathers the answers; several tasks over.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import anyio
import attrs
import cattrs

from troupe import BLAS, Agent, Runtime, open_runtime

PREFILL_STEP_SIZE = 128  # troupe's default; the server gets the same (its own is 2048)
BATCH = 32  # both systems' decode batch (the server's --decode-concurrency default)
CONCURRENCY = 32  # turns in flight at once, for both systems
SERVER_READY_SECONDS = 300.0
GOALS = {"village": 1.3, "crowd": 5.0, "restart": 5.0, "orchestrator": 1.2}

_WORDS = (
    "river", "market", "bridge", "storm", "harvest", "lantern", "miller", "baker", "smith", "well",
    "orchard", "chapel", "festival", "rumour", "letter", "stranger", "cart", "road", "hill",
    "mill", "wheat", "bread", "iron", "candle", "ledger", "debt", "promise", "quarrel", "wedding",
    "council", "roof", "flood", "barn", "goat", "shepherd", "inn", "ale", "song", "tax", "mayor",
    "guard", "gate", "wall", "tower", "bell", "cellar", "key", "map", "coin", "ring", "cloak",
    "boat", "net", "fish",
)


@attrs.frozen
class Sizes:
    """The size of each workload; ``FULL`` is the default, ``QUICK`` what ``--quick`` runs."""

    village_agents: int
    world_tokens: int
    persona_tokens: int
    village_rounds: int
    message_tokens: int
    reply_tokens: int
    crowd_agents: int
    crowd_context_tokens: int
    crowd_rounds: int
    crowd_budget: str
    workers: int
    tasks: int


FULL = Sizes(village_agents=16, world_tokens=1000, persona_tokens=150, village_rounds=6,
             message_tokens=60, reply_tokens=32, crowd_agents=200, crowd_context_tokens=2000,
             crowd_rounds=1, crowd_budget="512MB", workers=8, tasks=5)
QUICK = Sizes(village_agents=6, world_tokens=400, persona_tokens=60, village_rounds=2,
              message_tokens=40, reply_tokens=16, crowd_agents=64, crowd_context_tokens=300,
              crowd_rounds=1, crowd_budget="4MB", workers=4, tasks=2)


def _prose(rng: random.Random, chars: int, start: str = "") -> str:
    """About ``chars`` characters of sentences (the embedded tokenizer is byte-level, so
    characters are tokens; real tokenizers make them shorter, which changes nothing here)."""
    parts = [start] if start else []
    length = len(start)
    while length < chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 12)))
        sentence = sentence[0].upper() + sentence[1:] + ". "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:chars].rstrip() + "."


@attrs.frozen
class Turn:
    """One message to one agent, and how many tokens its reply may take."""

    agent_id: str
    text: str
    max_tokens: int


@attrs.frozen
class Outcome:
    """What one system made of one turn."""

    text: str
    tokens: int
    first_token_seconds: float
    prefilled: int


@attrs.frozen
class Phase:
    """A timed part of a workload on one system."""

    name: str
    seconds: float
    turns: int
    tokens_generated: int
    tokens_prefilled: int
    ttft_p50: float
    ttft_p99: float
    replies: tuple[str, ...] = attrs.field(repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds > 0 else 0.0


class System(Protocol):
    """One of the two systems, as the workloads drive it."""

    name: str

    async def spawn(self, agent_id: str, system: str) -> None: ...
    async def turn(self, turn: Turn) -> Outcome: ...
    async def restart(self) -> None: ...


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Recorder:
    """Runs rounds of turns on a system, CONCURRENCY at a time, and times phases."""

    def __init__(self, system: System, progress: TextIO) -> None:
        self.system = system
        self._progress = progress
        self.phases: list[Phase] = []
        self._outcomes: list[Outcome] = []
        self._limit = anyio.CapacityLimiter(CONCURRENCY)

    async def round(self, turns: Sequence[Turn]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(turns)

        async def one(i: int) -> None:
            async with self._limit:
                results[i] = await self.system.turn(turns[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(turns)):
                tg.start_soon(one, i)
        done = [r for r in results if r is not None]
        self._outcomes.extend(done)
        return done

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        self._outcomes = []
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        ttfts = [o.first_token_seconds for o in self._outcomes]
        self.phases.append(Phase(
            name=name, seconds=seconds, turns=len(self._outcomes),
            tokens_generated=sum(o.tokens for o in self._outcomes),
            tokens_prefilled=sum(o.prefilled for o in self._outcomes),
            ttft_p50=_percentile(ttfts, 0.5), ttft_p99=_percentile(ttfts, 0.99),
            replies=tuple(o.text for o in self._outcomes),
        ))
        print(f"  .. {self.system.name} {name}: {len(self._outcomes)} turns in {seconds:.1f}s",
              file=self._progress, flush=True)


# --- the workloads: the same calls on either system --------------------------------------


def _village_agents(sizes: Sizes, rng: random.Random) -> list[tuple[str, str]]:
    world = "The world: " + _prose(rng, sizes.world_tokens)
    return [(f"villager{i}", f"{world}\nYou are villager {i}. "
             + _prose(rng, sizes.persona_tokens, f"Villager {i} remembers"))
            for i in range(sizes.village_agents)]


def _village_round(sizes: Sizes, agents: Sequence[str], r: int) -> list[Turn]:
    rng = random.Random(1000 + r)
    return [Turn(a, _prose(rng, sizes.message_tokens, f"Round {r}, to {a}:"), sizes.reply_tokens)
            for a in agents]


async def village(rec: _Recorder, sizes: Sizes, troupe: Sequence[Phase] | None) -> None:
    """Agents sharing a world prompt answer a message each, all at once, round after round."""
    system = rec.system
    agents = _village_agents(sizes, random.Random(1))
    for agent_id, prompt in agents:
        await system.spawn(agent_id, prompt)
    async with rec.phase("rounds"):
        for r in range(sizes.village_rounds):
            await rec.round(_village_round(sizes, [a for a, _ in agents], r))


async def restart(rec: _Recorder, sizes: Sizes, troupe: Sequence[Phase] | None) -> None:
    """The village's rounds, the system restarted halfway."""
    system = rec.system
    agents = _village_agents(sizes, random.Random(2))
    ids = [a for a, _ in agents]
    for agent_id, prompt in agents:
        await system.spawn(agent_id, prompt)
    half = max(1, sizes.village_rounds // 2)
    async with rec.phase("first half"):
        for r in range(half):
            await rec.round(_village_round(sizes, ids, r))
    await system.restart()
    async with rec.phase("resumed half"):
        for r in range(half, 2 * half):
            await rec.round(_village_round(sizes, ids, r))


async def crowd(rec: _Recorder, sizes: Sizes, troupe: Sequence[Phase] | None) -> None:
    """Many agents with long contexts through a small KV budget; the server's clients start
    from the conversations troupe's setup turns made (``troupe``: its phases)."""
    system = rec.system
    rng = random.Random(3)
    # Nine tenths shared (one copy for troupe; the server can start from another agent's
    # cache), a tenth each agent's own: what only troupe keeps through the budget. (A
    # larger own share makes the setup, the same prefill on both systems, run too long.)
    world_share = sizes.crowd_context_tokens * 9 // 10
    world = "The world: " + _prose(rng, world_share)
    ids = [f"citizen{i}" for i in range(sizes.crowd_agents)]
    for i, agent_id in enumerate(ids):
        # A long history of its own after the shared world: what the budget cannot hold.
        await system.spawn(agent_id, f"{world}\nYou are citizen {i}. Your diary: " + _prose(
            rng, sizes.crowd_context_tokens - world_share, f"Citizen {i} wrote"))
    setup = _village_round(sizes, ids, 0)
    if troupe is None:
        async with rec.phase("setup"):
            await rec.round(setup)
    else:
        assert isinstance(system, ServerSystem)
        replies = next(p for p in troupe if p.name == "setup").replies
        for turn, reply in zip(setup, replies, strict=True):
            system.assume(turn, reply)
    async with rec.phase("rounds"):
        for r in range(1, 1 + sizes.crowd_rounds):
            await rec.round(_village_round(sizes, ids, r))


async def orchestrator(rec: _Recorder, sizes: Sizes, troupe: Sequence[Phase] | None) -> None:
    """A coordinator plans each task, workers answer their parts at once, it gathers them."""
    system = rec.system
    rng = random.Random(4)
    await system.spawn("coordinator", "You coordinate a team of workers. " + _prose(
        rng, sizes.world_tokens // 2, "Your methods:"))
    handbook = "The workers' handbook: " + _prose(rng, sizes.world_tokens // 2)
    workers = [f"worker{i}" for i in range(sizes.workers)]
    for i, worker in enumerate(workers):
        await system.spawn(worker, f"{handbook}\nYou are worker {i}, expert in "
                           f"{_WORDS[i % len(_WORDS)]}s.")
    async with rec.phase("tasks"):
        for task in range(sizes.tasks):
            trng = random.Random(2000 + task)
            [plan] = await rec.round([Turn("coordinator", _prose(
                trng, sizes.message_tokens, f"Task {task}: plan"), sizes.reply_tokens)])
            answers = await rec.round([
                Turn(w, f"Part {i} of task {task}, from the plan: {plan.text[:200]}",
                     sizes.reply_tokens) for i, w in enumerate(workers)])
            await rec.round([Turn("coordinator", "Your workers answered:\n" + "\n".join(
                f"{w}: {a.text[:100]}" for w, a in zip(workers, answers, strict=True)),
                sizes.reply_tokens)])


Workload = Callable[[_Recorder, Sizes, Sequence[Phase] | None], Awaitable[None]]
"""Runs on a system through the recorder; gets troupe's phases when it runs on the server."""

WORKLOADS: dict[str, Workload] = {
    "village": village, "crowd": crowd, "restart": restart, "orchestrator": orchestrator,
}
TIMED = {"village": "rounds", "crowd": "rounds", "restart": "resumed half",
         "orchestrator": "tasks"}
"""The phase each workload's ratio is taken on."""


# --- troupe ------------------------------------------------------------------------------


class TroupeSystem:
    """troupe in this process, with a store in a temporary directory."""

    name = "troupe"

    def __init__(self, model: str, store: Path, kv_budget: str | None) -> None:
        self._model = model
        self._store = store
        self._budget = kv_budget
        self._stack = contextlib.AsyncExitStack()
        self._rt: Runtime | None = None
        self._agents: dict[str, Agent] = {}

    async def open(self) -> None:
        kwargs: dict[str, Any] = {"kv_budget": self._budget} if self._budget else {}
        self._rt = await self._stack.enter_async_context(open_runtime(
            self._model, self._store, max_batch_size=BATCH,
            prefill_step_size=PREFILL_STEP_SIZE, **kwargs))
        self._agents = {}
        # First use of MLX's kernels, outside every timing (the server is warmed up alike).
        await (await self._rt.spawn("warmup-" + os.urandom(4).hex())).say("warm up", max_tokens=4)

    async def close(self) -> None:
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self._rt = None

    @property
    def runtime(self) -> Runtime:
        assert self._rt is not None
        return self._rt

    async def spawn(self, agent_id: str, system: str) -> None:
        self._agents[agent_id] = await self.runtime.spawn(agent_id, system=system)

    async def turn(self, turn: Turn) -> Outcome:
        agent = self._agents.get(turn.agent_id)
        if agent is None:
            agent = self._agents[turn.agent_id] = await self.runtime.get(turn.agent_id)
        started = time.perf_counter()
        first: float | None = None
        stream = agent.stream(turn.text, max_tokens=turn.max_tokens)
        async for delta in stream:
            if first is None and delta:
                first = time.perf_counter() - started
        reply = stream.reply
        assert reply is not None
        return Outcome(reply.text, len(reply.tokens),
                       first if first is not None else time.perf_counter() - started,
                       reply.prompt_tokens)

    async def restart(self) -> None:
        await self.close()
        await self.open()


# --- mlx_lm.server -----------------------------------------------------------------------

# The server imports troupe first, so it loads the same BLAS the same way (before MLX).
_SERVER_MAIN = (
    "import sys, troupe, mlx_lm.server as s; "
    "print('troupe-peer: BLAS', troupe.BLAS.name, file=sys.stderr, flush=True); "
    "sys.argv = ['mlx_lm.server', *sys.argv[1:]]; s.main()"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerSystem:
    """``mlx_lm.server`` in a subprocess; each agent's client keeps its conversation."""

    name = "mlx_lm.server"

    def __init__(self, model_dir: Path, log: Path, cache_entries: int,
                 cache_bytes: int | None) -> None:
        self.model_dir = model_dir
        self._log = log
        self._entries = cache_entries
        self._bytes = cache_bytes
        self._process: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._history: dict[str, list[dict[str, str]]] = {}
        self._http = anyio.CapacityLimiter(CONCURRENCY + 4)
        self.blas = "unknown"

    checks_blas = True
    """Whether the server says which BLAS it loaded (mlx_lm.server, through _SERVER_MAIN)."""

    def command(self, port: int) -> list[str]:
        """The server's command line, listening on ``port``."""
        args = [sys.executable, "-c", _SERVER_MAIN, "--model", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(port),
                "--prefill-step-size", str(PREFILL_STEP_SIZE),
                "--decode-concurrency", str(BATCH), "--prompt-concurrency", "8",
                "--prompt-cache-size", str(self._entries), "--log-level", "WARNING",
                "--max-tokens", "4096"]
        if self._bytes is not None:
            args += ["--prompt-cache-bytes", str(self._bytes)]
        return args

    async def open(self) -> None:
        self._port = _free_port()
        args = self.command(self._port)

        def start() -> subprocess.Popen[bytes]:
            with self._log.open("ab") as log:
                return subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        self._process = await anyio.to_thread.run_sync(start)
        deadline = time.monotonic() + SERVER_READY_SECONDS
        while not await anyio.to_thread.run_sync(self._healthy):
            if self._process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self._process.returncode}; "
                                   f"its log: {self._log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlx_lm.server was not ready in {SERVER_READY_SECONDS:.0f}s;"
                                   f" its log: {self._log}")
            await anyio.sleep(0.2)
        # The server loads its model and builds its batch on the first request.
        await anyio.to_thread.run_sync(
            self._chat, [{"role": "user", "content": "warm up"}], 4, limiter=self._http)
        self.blas = self._blas_from_log() if self.checks_blas else BLAS.name
        if self.blas != BLAS.name:
            raise RuntimeError(f"mlx_lm.server loaded {self.blas}, troupe {BLAS.name}: "
                               "the comparison would measure BLAS, not the systems")

    def _blas_from_log(self) -> str:
        lines = self._log.read_text(errors="replace").splitlines()
        said = [line.split("BLAS", 1)[1].strip() for line in lines
                if line.startswith("troupe-peer: BLAS")]
        return said[-1] if said else "unknown"

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    async def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await anyio.to_thread.run_sync(self._process.wait, 30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                await anyio.to_thread.run_sync(self._process.wait)
        self._process = None

    async def spawn(self, agent_id: str, system: str) -> None:
        self._history[agent_id] = [{"role": "system", "content": system}]

    async def turn(self, turn: Turn) -> Outcome:
        messages = self._history[turn.agent_id]
        messages.append({"role": "user", "content": turn.text})
        outcome = await anyio.to_thread.run_sync(self._chat, messages, turn.max_tokens,
                                                 limiter=self._http)
        # What the client got back is what it sends next time, as an OpenAI client does.
        messages.append({"role": "assistant", "content": outcome.text})
        return outcome

    async def restart(self) -> None:
        await self.close()
        await self.open()

    def assume(self, turn: Turn, reply: str) -> None:
        """Continue a conversation from a turn another system took."""
        self._history[turn.agent_id] += [{"role": "user", "content": turn.text},
                                         {"role": "assistant", "content": reply}]

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> Outcome:
        body = json.dumps({"model": "default_model", "messages": messages,
                           "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        # The server listens with a backlog of 5: a burst of clients sees resets; retry.
        for attempt in range(50):
            try:
                return self._post(body)
            except (ConnectionError, http.client.RemoteDisconnected) as exc:
                if attempt == 49:
                    raise RuntimeError(f"mlx_lm.server stopped answering: {exc}") from exc
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> Outcome:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=3600)
        try:
            started = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"mlx_lm.server answered {response.status}: "
                                   f"{response.read()[:300]!r}")
            first: float | None = None
            text: list[str] = []
            usage: dict[str, Any] = {}
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta and first is None:
                        first = time.perf_counter() - started
                    text.append(delta)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            return Outcome("".join(text), int(usage.get("completion_tokens", 0)),
                           first if first is not None else time.perf_counter() - started,
                           int(usage.get("prompt_tokens", 0)) - int(cached))
        finally:
            conn.close()


# --- running and reporting ---------------------------------------------------------------


@attrs.frozen
class WorkloadResult:
    """One workload on both systems: their phases, how their replies compare, and troupe's
    statistics at the end."""

    workload: str
    timed_phase: str
    troupe: tuple[Phase, ...]
    server: tuple[Phase, ...]
    replies_compared: int
    replies_differing: int
    replies_differing_by_leading_space: int
    troupe_statistics: dict[str, Any]

    def timed(self, phases: Sequence[Phase]) -> Phase:
        return next(p for p in phases if p.name == self.timed_phase)

    @property
    def ratio(self) -> float:
        """Server's wall time ÷ troupe's, on the timed phase."""
        return self.timed(self.server).seconds / self.timed(self.troupe).seconds


def _compare(ours: Sequence[Phase], theirs: Sequence[Phase]) -> tuple[int, int, int]:
    both = {p.name for p in theirs}
    mine = [r for p in ours if p.name in both for r in p.replies]
    peer = [r for p in theirs for r in p.replies]
    differ = [(a, b) for a, b in zip(mine, peer, strict=True) if a != b]
    by_space = sum(1 for a, b in differ if a.lstrip(" ") == b.lstrip(" "))
    return len(mine), len(differ), by_space


def _server_cache_bytes(budget: int | None, sizes: Sizes, kv_per_token: int) -> int | None:
    """The server's --prompt-cache-bytes for troupe's ``kv_budget`` (bytes, as troupe's
    statistics report it).

    troupe's budget bounds idle KV; the server's flag bounds idle plus in-flight KV (it
    trims its cache to the flag minus the running batch's bytes). So the server gets the
    budget plus the KV of a full set of turns in flight, or it would keep nothing at all.
    """
    if budget is None:
        return None
    turn_tokens = sizes.message_tokens + sizes.reply_tokens + 32  # and the template's
    in_flight = min(CONCURRENCY, sizes.crowd_agents) * (sizes.crowd_context_tokens
                               + (1 + sizes.crowd_rounds) * turn_tokens) * kv_per_token
    return budget + in_flight


async def run_workload(name: str, model: str, sizes: Sizes, scratch: Path,
                       out: TextIO) -> WorkloadResult:
    """Run workload ``name`` on troupe, then on ``mlx_lm.server``, with files under
    ``scratch``; print the comparison to ``out`` and return it."""
    run = WORKLOADS[name]
    print(f"\n{name}", file=out, flush=True)
    budget = sizes.crowd_budget if name == "crowd" else None
    troupe = TroupeSystem(model, scratch / f"{name}-store", budget)
    try:
        await troupe.open()
        recorder = _Recorder(troupe, out)
        await run(recorder, sizes, None)
        ours = recorder.phases
        stats = cattrs.unstructure(troupe.runtime.statistics())
        kv_per_token = troupe.runtime.model.kv_bytes_per_token
        # The server loads the directory troupe loaded (the embedded model's, made once).
        model_dir = Path(troupe.runtime.model.path)
    finally:
        # Not shielded: it exits the runtime's own task group, entered outside any new scope.
        await troupe.close()
    agents = {"village": sizes.village_agents, "restart": sizes.village_agents,
              "crowd": sizes.crowd_agents, "orchestrator": sizes.workers + 1}[name]
    server = ServerSystem(model_dir, scratch / f"{name}-server.log",
                          # Entries for every agent's turns and system prompts, and more.
                          cache_entries=4 * agents + 16,
                          cache_bytes=_server_cache_bytes(
                              stats["kv_budget"] if budget else None, sizes, kv_per_token))
    try:
        await server.open()
        recorder = _Recorder(server, out)
        await run(recorder, sizes, ours)
        theirs = recorder.phases
    finally:
        with anyio.CancelScope(shield=True):  # Ctrl-C still stops the server process
            await server.close()
    compared, differing, by_space = _compare(ours, theirs)
    result = WorkloadResult(name, TIMED[name], tuple(ours), tuple(theirs), compared,
                            differing, by_space, stats)
    _print_result(result, out)
    return result


def _print_result(result: WorkloadResult, out: TextIO) -> None:
    for system, phases in (("troupe", result.troupe), ("mlx_lm.server", result.server)):
        for p in phases:
            mark = " *" if p.name == result.timed_phase else ""
            print(f"  {system:<14} {p.name:<13}{mark:2} {p.seconds:7.1f}s {p.turns:4} turns "
                  f"{p.tokens_per_second:7.1f} tok/s  prefilled {p.tokens_prefilled:7}  "
                  f"TTFT p50 {p.ttft_p50 * 1e3:6.0f} ms p99 {p.ttft_p99 * 1e3:6.0f} ms",
                  file=out)
    goal = GOALS[result.workload]
    print(f"  ratio server / troupe on the {result.timed_phase}: {result.ratio:.2f}x "
          f"(goal {goal}x); greedy replies differing: {result.replies_differing} of "
          f"{result.replies_compared} ({result.replies_differing_by_leading_space} only by a "
          "leading space)", file=out, flush=True)


def _check_chart_support(chart_path: str | None) -> None:
    if chart_path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--chart needs matplotlib: pip install 'troupe[chart]'") from None


def _draw_chart(results: Sequence[WorkloadResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.workload for r in results]
    ratios = [r.ratio for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, ratios, color="#4c72b0", label="server time / troupe time")
    ax.scatter(names, [GOALS[n] for n in names], marker="_", s=900, color="#c44e52",
               zorder=3, label="goal")
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    for bar, ratio in zip(bars, ratios, strict=True):
        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_ylabel("mlx_lm.server wall time / troupe wall time")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def bench_peer(*, model: str, quick: bool, only: str | None, json_path: str | None,
                     chart_path: str | None, out: TextIO = sys.stdout) -> None:
    """Run the workloads on both systems and print, and optionally save, the comparison."""
    names = list(WORKLOADS) if only is None else [n.strip() for n in only.split(",")]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(WORKLOADS)}")
    _check_chart_support(chart_path)
    sizes = QUICK if quick else FULL
    print(f"troupe bench peer{' --quick' if quick else ''}: model {model!r}, BLAS {BLAS.name}, "
          f"both systems greedy, {CONCURRENCY} turns in flight, prefill chunk "
          f"{PREFILL_STEP_SIZE}; * marks the phase each ratio is taken on", file=out, flush=True)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="troupe-peer-") as scratch:
        for name in names:
            results.append(await run_workload(name, model, sizes, Path(scratch), out))
    elapsed = time.perf_counter() - started
    print(f"\n{'workload':<13} {'ratio':>7} {'goal':>6}", file=out)
    for r in results:
        print(f"{r.workload:<13} {r.ratio:6.2f}x {GOALS[r.workload]:5.1f}x", file=out)
    print(f"(whole run {elapsed:.0f}s)", file=out, flush=True)
    if json_path:
        report = {
            "model": model, "blas": BLAS.name, "quick": quick, "sizes": attrs.asdict(sizes),
            "seconds": elapsed,
            "workloads": [{
                "workload": r.workload, "timed_phase": r.timed_phase, "ratio": r.ratio,
                "goal": GOALS[r.workload], "replies_compared": r.replies_compared,
                "replies_differing": r.replies_differing,
                "replies_differing_by_leading_space": r.replies_differing_by_leading_space,
                "troupe": [_phase_json(p) for p in r.troupe],
                "server": [_phase_json(p) for p in r.server],
                "troupe_statistics": r.troupe_statistics,
            } for r in results],
        }
        await anyio.Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if chart_path:
        _draw_chart(results, chart_path,
                    f"troupe bench peer{' --quick' if quick else ''} ({model}, {BLAS.name})")


def _phase_json(phase: Phase) -> dict[str, Any]:
    return {"phase": phase.name, "seconds": phase.seconds, "turns": phase.turns,
            "tokens_generated": phase.tokens_generated,
            "tokens_per_second": phase.tokens_per_second,
            "tokens_prefilled": phase.tokens_prefilled,
            "ttft_p50_seconds": phase.ttft_p50, "ttft_p99_seconds": phase.ttft_p99}
