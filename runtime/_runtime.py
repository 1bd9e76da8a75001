"""The runtime: opens the model, the store and the actors, and closes them in order."""

from __future__ import annotations

import logging
import os
import secrets
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc
import attrs
import trio.lowlevel

from ._actor import Actor
from ._embedded import SHAPES, embedded_model_path
from ._errors import AgentExistsError, AgentNotFoundError, ModelLoadError, RuntimeClosedError
from ._records import Message, RuntimeStatistics, TurnCounters
from ._validate import (
    check_id,
    check_int,
    check_path,
    check_seconds,
    check_str,
    parse_bytes,
)
from .actors._agent import Agent, AgentActor, AgentState, Services, chat_messages
from .actors._engine import BUSY_TRIM_FLOOR, IDLE_TRIM_SECONDS, Engine
from .actors._mlx import ModelInfo
from .actors._renderer import Renderer
from .actors._storage import (
    Activate,
    AddAgent,
    Deactivate,
    DeleteAgent,
    ForkAgent,
    Storage,
)

logger = logging.getLogger("troupe")

DEFAULT_KV_BUDGET = "1GiB"
DEFAULT_IDLE_TIMEOUT = 300.0
# Turns admitted beyond the batch's rows: prefills ready to join as rows free up.
PREFILL_SLACK = 8
# Upper bounds that catch nonsense (a typo, a float turned int) before the model loads.
MAX_BATCH_SIZE = 1024
MAX_PREFILL_STEP_SIZE = 1 << 20  # no model's context is longer
MAX_MAILBOX_SIZE = 1 << 16


def _model_source(spec: str) -> Callable[[], Path]:
    """Where the model comes from; the returned function runs on the engine thread."""
    if spec == "embedded" or spec.startswith("embedded:"):
        size = spec.partition(":")[2] or "small"
        if size not in SHAPES:
            raise ValueError(f"model {spec!r}: unknown embedded size {size!r}; "
                             f"use one of {sorted(SHAPES)}")
        return lambda: embedded_model_path(size)  # type: ignore[arg-type]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is not a local directory; troupe never downloads weights: "
            "fetch the model first (e.g. `huggingface-cli download mlx-community/...`) "
            "and pass its path, or use model='embedded'"
        )
    return lambda: path


def _store_root(store: object) -> Path | None:
    return None if store is None else Path(check_path(store, "store")).expanduser()


_TransitionKind = Literal["adding", "activating", "deactivating", "deleting"]


@attrs.define(eq=False)
class _Transition:
    """An agent being added, activated or deactivated: it is neither handed out nor
    retired until ``done``, so that it never has two actors."""

    kind: _TransitionKind
    done: anyio.Event = attrs.field(factory=anyio.Event)


class Runtime:
    """A running troupe: one model and its engine, one store, many agents.

    Made by ``open_runtime``; usable until its ``async with`` block ends.
    """

    def __init__(
        self,
        task_group: anyio.abc.TaskGroup,
        engine: Engine,
        storage: Storage,
        services: Services,
        mailbox_size: int,
        stored_ids: list[str],
    ) -> None:
        self._task_group = task_group
        self._engine = engine
        self._storage = storage
        self._services = services
        self._mailbox_size = mailbox_size
        # Every agent, in spawn order; only the active ones have an actor (and a task).
        self._ids: dict[str, None] = dict.fromkeys(stored_ids)
        self._agents: dict[str, AgentActor] = {}
        self._transitions: dict[str, _Transition] = {}
        self._activations = 0
        self._deactivations = 0
        # Retired actors some handle still holds: their successor is linked on activation.
        self._retired: weakref.WeakValueDictionary[str, AgentActor] = (
            weakref.WeakValueDictionary()
        )
        self._reaper = anyio.CancelScope()
        self._closed = False
        # Short-lived agents of stateless HTTP requests (``_spawn_with(None, ...)``): never
        # stored, listed or retired for being idle.
        self._ephemeral: set[str] = set()
        storage.kv.set_busy(self._busy)

    def _busy(self, agent_id: str) -> bool:
        # Turns queued keep their agent's KV in memory (the storage's eviction policy).
        actor = self._agents.get(agent_id)
        return actor is not None and actor.queued > 0

    @property
    def model(self) -> ModelInfo:
        """The loaded model: its path, context length, KV bytes per token..."""
        return self._services.info

    @property
    def store(self) -> Path | None:
        """The store directory, or None for an in-memory runtime."""
        return self._storage.root

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle_trim_seconds(self) -> float:
        """Seconds the engine waits with no turn to run before it hands the memory freed by
        finished turns back to the OS: an idle runtime's resident memory has settled that
        long after its last turn."""
        return IDLE_TRIM_SECONDS

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("the runtime is closed")

    def _register(self, agent_id: str, state: AgentState) -> AgentActor:
        actor = AgentActor(agent_id, state, self._services, self._mailbox_size)
        self._agents[agent_id] = actor
        self._ids[agent_id] = None
        return actor

    def _unregister(self, agent_id: str) -> None:
        del self._agents[agent_id]
        del self._ids[agent_id]

    def _handle(self, actor: AgentActor) -> Agent:
        return Agent(actor, self._activate)

    @contextmanager
    def _transition(self, agent_id: str, kind: _TransitionKind) -> Iterator[None]:
        """Mark ``agent_id`` as in ``kind`` of transition while the block runs.

        Callers set it only where none is set (checked without an await in between).
        """
        if agent_id in self._transitions:
            raise RuntimeError(f"agent {agent_id!r} is already "
                               f"{self._transitions[agent_id].kind}")
        mark = self._transitions[agent_id] = _Transition(kind)
        try:
            yield
        finally:
            # Only the task that set the mark removes it, never another task's mark.
            if self._transitions.get(agent_id) is mark:
                del self._transitions[agent_id]
            mark.done.set()

    async def _settled(self, agent_id: str) -> None:
        """Wait until ``agent_id`` is in no transition (RuntimeClosedError once closed)."""
        while True:
            self._check_open()
            transition = self._transitions.get(agent_id)
            if transition is None:
                return
            await transition.done.wait()

    async def _activate(self, agent_id: str) -> AgentActor:
        """The agent's actor, reading it from the store first if it is not active."""
        await self._settled(agent_id)
        # No await from here to the mark: nobody else can start a transition meanwhile.
        actor = self._agents.get(agent_id)
        if actor is not None:
            return actor
        if agent_id not in self._ids:
            raise AgentNotFoundError(f"no agent {agent_id!r}")
        with self._transition(agent_id, "activating"):
            # Shielded: the lease taken in the store must end up with a running actor.
            with anyio.CancelScope(shield=True):
                record = await self._storage.call(Activate(agent_id))
            if record is None:
                raise AgentNotFoundError(f"no agent {agent_id!r} in the store")
            actor = AgentActor(agent_id, AgentState.from_record(record), self._services,
                               self._mailbox_size)
            self._agents[agent_id] = actor
            self._activations += 1
            retired = self._retired.pop(agent_id, None)
            if retired is not None:
                retired.successor = actor
            self._launch(actor)
            plan = None if self._closed else self._storage.kv.plan_prefetch(agent_id)
            if plan is not None:
                # Addressed now, likely to speak soon: its KV starts coming back from disk,
                # in a task of its own; its turns wait for it.
                self._task_group.start_soon(self._storage.prefetch, agent_id, plan,
                                            name=f"troupe prefetch {agent_id!r}")
            # Idle from now on, not from before the store was asked for it.
            actor.last_active = anyio.current_time()
            return actor

    @trio.lowlevel.enable_ki_protection  # like the actors: see Actor.run
    async def _reap(self, idle_timeout: float) -> None:
        """Deactivate agents idle for ``idle_timeout`` seconds (their state is stored).

        It runs as long as the runtime: a failure to retire one agent is logged and the
        agent stays active (only cancellation ends it).
        """
        with self._reaper:
            while True:
                await anyio.sleep(idle_timeout / 4)
                now = anyio.current_time()
                for actor in list(self._agents.values()):
                    if not self._retirable(actor, now, idle_timeout):
                        continue
                    try:
                        await self._deactivate(actor)
                    except Exception:
                        logger.exception("could not deactivate agent %r", actor.agent_id)

    def _retirable(self, actor: AgentActor, now: float, idle_timeout: float) -> bool:
        # Checked again for each actor: deactivating the ones before it awaited.
        agent_id = actor.agent_id
        return (not self._closed and self._agents.get(agent_id) is actor
                and agent_id not in self._transitions and agent_id not in self._ephemeral
                and actor.idle and now - actor.last_active >= idle_timeout)

    async def _deactivate(self, actor: AgentActor) -> None:
        agent_id = actor.agent_id
        with self._transition(agent_id, "deactivating"):
            actor.deactivated = True
            actor.stop()  # idle: nothing is queued or running
            del self._agents[agent_id]
            self._retired[agent_id] = actor
            self._deactivations += 1
            # Queued before any later Activate of this agent (which waits for the mark):
            # the store releases the old lease before taking up the new one.
            await self._storage.send(Deactivate(agent_id))

    def _start(self, actor: AgentActor) -> None:
        self._task_group.start_soon(actor.run, name=f"troupe {actor.name}")

    async def spawn(self, agent_id: str, *, system: str = "") -> Agent:
        """Start a new agent. AgentExistsError if the id is taken (here or in the store).

        ContextLengthError if the system prompt leaves no room for a conversation. Once
        the store has the new agent, the spawn has happened: a cancelled or closing
        caller leaves it spawned (and a closed runtime's agent takes no turns).
        """
        self._check_open()
        check_id(agent_id)
        check_str(system, "system")
        if agent_id in self._ids:
            raise AgentExistsError(f"agent {agent_id!r} exists already")
        if system:
            probe = [Message("user", "?")]
            await self._services.renderer.check_fits(
                agent_id, chat_messages(system, probe), len(system)
            )
            self._check_open()
            if agent_id in self._ids:
                raise AgentExistsError(f"agent {agent_id!r} exists already")
        actor = await self._add(agent_id, AgentState(system), AddAgent(agent_id, system))
        return self._handle(actor)

    async def _spawn_with(
        self, agent_id: str | None, system: str, transcript: list[Message]
    ) -> Agent:
        """An agent that starts with ``transcript`` (the HTTP server's: a request's
        conversation, or a response chain's first input).

        ``agent_id`` None: a short-lived agent for one stateless request, which the store
        never hears of and ``_delete`` must end; its turns reuse every block another agent
        or request computed for the same tokens.
        """
        self._check_open()
        ephemeral = agent_id is None
        if agent_id is None:
            agent_id = f"~{secrets.token_hex(8)}"  # "~" is outside the ids users may pick
            self._ephemeral.add(agent_id)
        else:
            check_id(agent_id)
            if agent_id in self._ids:
                raise AgentExistsError(f"agent {agent_id!r} exists already")
        request = AddAgent(agent_id, system, tuple((m.role, m.content) for m in transcript),
                           ephemeral=ephemeral)
        state = AgentState(system, list(transcript), saved=len(transcript))
        try:
            actor = await self._add(agent_id, state, request)
        except BaseException:
            self._ephemeral.discard(agent_id)
            raise
        return self._handle(actor)

    def _kv_over_budget(self) -> bool:
        """Whether the KV in memory exceeds the budget: eviction has taken what it could,
        and the rest is pinned by turns under way (the HTTP server's admission)."""
        return self._storage.kv.over_budget()

    async def _count_tokens(self, system: str, transcript: list[Message]) -> int:
        """Tokens of the prompt a turn on this conversation would prefill (or reuse)."""
        self._check_open()
        chars = len(system) + sum(len(m.content) for m in transcript)
        self._services.renderer.check_length("count_tokens", chars, 1)
        return len(await self._services.renderer.render(chat_messages(system, transcript),
                                                        chars))

    async def delete(self, agent_id: str) -> None:
        """Delete an agent for good: its turns in flight and queued are cancelled (their
        callers get AgentNotFoundError); its transcript, store rows and tail file go, and
        so do the files of its KV blocks that no other stored agent holds; in memory its
        blocks are released (kept while another agent holds them, else evictable like any
        cache).

        AgentNotFoundError if there is no such agent; RuntimeClosedError after close.
        Handles to it answer AgentNotFoundError from then on.
        """
        self._check_open()
        check_id(agent_id)
        await self._delete(agent_id)

    async def _delete(self, agent_id: str) -> None:
        await self._settled(agent_id)
        if agent_id not in self._ids:
            raise AgentNotFoundError(f"no agent {agent_id!r}")
        with self._transition(agent_id, "deleting"):
            # Shielded: once begun, the runtime and the store must both forget the agent.
            with anyio.CancelScope(shield=True):
                actor = self._agents.pop(agent_id, None)
                del self._ids[agent_id]
                self._ephemeral.discard(agent_id)
                self._retired.pop(agent_id, None)
                if actor is not None:
                    # Its handles activate anew, and find no agent of this id.
                    actor.deactivated = actor.deleted = True
                    actor.stop()
                    await actor.finished.wait()
                await self._storage.call(DeleteAgent(agent_id))

    async def _add(
        self, agent_id: str, state: AgentState, request: AddAgent | ForkAgent
    ) -> AgentActor:
        """Register a new agent (reserving its id before any await), store it, start it.

        Until it is started, the agent is in transition: not handed out, not retired.
        """
        with self._transition(agent_id, "adding"):
            actor = self._register(agent_id, state)
            try:
                # Shielded: the store and the runtime must agree on whether the agent exists.
                with anyio.CancelScope(shield=True):
                    covered = await self._storage.call(request)
            except BaseException:
                self._unregister(agent_id)
                raise
            actor.cached = covered or 0
            self._launch(actor)
            return actor

    def _launch(self, actor: AgentActor) -> None:
        if self._closed:
            actor.stop()  # never started: its handles answer RuntimeClosedError
        else:
            self._start(actor)

    async def _adopt_fork(self, source: AgentActor, new_id: str) -> AgentActor:
        """Register ``new_id`` as a fork of ``source`` (called from ``source``'s own task)."""
        self._check_open()
        if new_id in self._ids:
            raise AgentExistsError(f"agent {new_id!r} exists already")
        state = source.state
        copied = AgentState(state.system, list(state.transcript), turns=state.turns,
                            saved=len(state.transcript))
        fork = ForkAgent(source.agent_id, new_id, state.system,
                         [(m.role, m.content) for m in state.transcript], state.turns)
        return await self._add(new_id, copied, fork)

    async def get(self, agent_id: str) -> Agent:
        """The agent with this id (AgentNotFoundError if none), activating it if it is
        only in the store."""
        self._check_open()
        check_id(agent_id)
        return self._handle(await self._activate(agent_id))

    def agent_ids(self) -> tuple[str, ...]:
        """Ids of every agent, active or only in the store, in the order they were spawned."""
        if not self._ephemeral:
            return tuple(self._ids)
        return tuple(i for i in self._ids if i not in self._ephemeral)

    def statistics(self) -> RuntimeStatistics:
        """An immutable snapshot of the runtime's counters."""
        # Each owner snapshots its own part; the runtime adds its agents'.
        # The turn counters are the agents' running totals, copied here as they stand.
        parts = (self._services.counters, self._engine.statistics(),
                 self._storage.kv.statistics(), self._storage.statistics())
        return RuntimeStatistics(
            agents=len(self._ids) - len(self._ephemeral),
            agents_active=len(self._agents),
            activations=self._activations,
            deactivations=self._deactivations,
            **{k: v for part in parts for k, v in attrs.asdict(part, recurse=False).items()},
        )

    async def _shutdown(self) -> None:
        """Cancel turns in flight, stop the actors, then join the threads (in that order)."""
        self._closed = True
        self._reaper.cancel()
        actors: list[Actor] = [*self._agents.values()]
        for actor in actors:
            actor.stop()
        for actor in actors:
            await actor.finished.wait()
        self._storage.stop()
        await self._storage.finished.wait()
        await self._engine.stop()
        await self._storage.aclose()


async def _unbound_fork(source: AgentActor, new_id: str) -> AgentActor:
    raise RuntimeClosedError("the runtime is not open")


@asynccontextmanager
async def open_runtime(
    model: str | os.PathLike[str] = "embedded",
    store: str | os.PathLike[str] | None = None,
    *,
    max_batch_size: int = 32,
    prefill_step_size: int = 128,
    mailbox_size: int = 16,
    kv_budget: int | str = DEFAULT_KV_BUDGET,
    block_size: int | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
) -> AsyncIterator[Runtime]:
    """Open a runtime for the duration of an ``async with`` block (trio or asyncio).

    ``model``: ``"embedded"`` (the small embedded model, made on first use),
    ``"embedded:tiny"``, or a local MLX model directory. ``store``: a directory for the
    SQLite catalog and KV files (agents come back when it is reopened), or None to keep
    everything in memory. Every option is checked before anything starts (ValueError or
    TypeError, naming the option). Leaving the block cancels turns still in flight,
    persists what was committed, joins every thread the runtime started and lets go of
    the model's weights and the KV in memory.

    ``block_size``: tokens per KV block; None takes the store's (a store keeps the size
    it was made with, and refuses another with StoreError), else 128.
    """
    # Every option is checked here, before the model loads or the store opens.
    spec = check_path(model, "model")
    root = _store_root(store)
    max_batch_size = check_int(max_batch_size, "max_batch_size", 1, MAX_BATCH_SIZE)
    prefill_step_size = check_int(prefill_step_size, "prefill_step_size", 1,
                                  MAX_PREFILL_STEP_SIZE)
    mailbox_size = check_int(mailbox_size, "mailbox_size", 1, MAX_MAILBOX_SIZE)
    budget = parse_bytes(kv_budget, "kv_budget")
    idle_timeout = check_seconds(idle_timeout, "idle_timeout")
    if block_size is not None:
        block_size = check_int(block_size, "block_size", 16, 4096)
    source = _model_source(spec)
    # While the batch runs, the heap may hold as much free as the KV budget (its pages are
    # reused); past that the engine hands pages back. A lower mark saved memory but cost
    # turns time: README, "Memory given back", has the measurements.
    engine = Engine(source, max_batch_size=max_batch_size, prefill_step_size=prefill_step_size,
                    trim_above=max(BUSY_TRIM_FLOOR, budget))
    single: BaseException | None = None
    try:
        async with anyio.create_task_group() as task_group:
            try:
                info = await engine.start()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await engine.stop()
                raise
            storage = Storage(root, engine, info, engine.model.layout, mailbox_size,
                              budget=budget, block_size=block_size)
            try:
                stored_ids = await storage.open()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await engine.stop()
                    await storage.aclose()
                raise
            services = Services(
                renderer=Renderer(engine.model.tokenizer, info.context_length), info=info,
                engine=engine, storage=storage, counters=TurnCounters(),
                # Only admitted turns pin KV: the batch's rows and prefills about to join.
                admission=anyio.CapacityLimiter(max_batch_size + PREFILL_SLACK),
                adopt_fork=_unbound_fork,
            )
            runtime = Runtime(task_group, engine, storage, services, mailbox_size,
                              stored_ids)
            services.adopt_fork = runtime._adopt_fork
            task_group.start_soon(storage.run, name="troupe storage")
            if root is not None and idle_timeout is not None:
                task_group.start_soon(runtime._reap, idle_timeout, name="troupe reaper")
            try:
                yield runtime
            finally:
                with anyio.CancelScope(shield=True):
                    await runtime._shutdown()
    except BaseExceptionGroup as group:
        # The runtime's own tasks never raise, so a group holds the body's one exception:
        # hand it back as it was raised.
        if len(group.exceptions) != 1:
            raise
        single = group.exceptions[0]
    if single is not None:
        raise single
