"""The agent actor and ``Agent``, the handle users hold.

An agent owns its transcript; its KV lives in blocks the storage actor owns, on a lease. A
turn renders the chat template, checks out the longest prefix of the prompt that known
blocks cover (its own, or any agent's), starts only the rest in the engine (which takes
the prefix from the storage and hands the blocks it cuts back to it), and commits. The
agent holds an opaque ``TurnLease`` and never a KV array. One agent's turns run one at a
time, in the order they came.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._actor import Actor, Pending, Request
from .._errors import (
    AgentNotFoundError,
    ContextLengthError,
    EngineError,
    IncompleteReplyError,
    RuntimeClosedError,
    StoreError,
    TroupeError,
)
from .._records import (
    AgentStatistics,
    FinishReason,
    Message,
    Reply,
    Role,
    Sampling,
    ToolCall,
    TurnCounters,
)
from .._schema import Constraint, make_constraint
from .._tools import (
    Tool,
    as_tools,
    call_tools,
    check_tool_choice,
    parse_tool_calls,
    tool_constraint,
)
from .._validate import check_id, check_message, check_str
from ..storage._catalog import AgentRecord
from ._engine import Engine, FinishEvent, PromptEvent, TurnChannel
from ._kv import TurnLease
from ._mlx import ModelInfo
from ._renderer import Renderer
from ._storage import Checkout, Commit, Install, Storage, WritePublished

logger = logging.getLogger("troupe")
R = TypeVar("R")


@attrs.frozen
class Turn(Request[Reply]):
    text: str
    sampling: Sampling
    deltas: MemoryObjectSendStream[str] | None = attrs.field(default=None, repr=False)
    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    results: tuple[Message, ...] = ()
    """Tool results this turn answers (``Agent.run``): they, not a user message, are the
    turn's new messages."""

    @property
    def new_messages(self) -> list[Message]:
        return list(self.results) if self.results else [Message("user", self.text)]

    @property
    def new_chars(self) -> int:
        return sum(len(m.content) for m in self.new_messages)


@attrs.frozen
class Tell(Request[None]):
    text: str


@attrs.frozen
class Fork(Request["AgentActor"]):
    new_id: str


@attrs.define
class AgentState:
    """What an agent remembers; restored from the store on reopen."""

    system: str
    transcript: list[Message] = attrs.field(factory=list)
    turns: int = 0
    saved: int = 0
    """How many messages of the transcript the store has (all, unless a tell failed)."""

    @classmethod
    def from_record(cls, record: AgentRecord) -> AgentState:
        return cls(
            system=record.system,
            transcript=[Message(cast(Role, role), text) for role, text in record.messages],
            saved=len(record.messages),
            turns=record.turns,
        )


@attrs.define(eq=False)
class Services:
    """The runtime parts an agent talks to."""

    renderer: Renderer
    info: ModelInfo
    engine: Engine
    storage: Storage
    counters: TurnCounters
    admission: anyio.CapacityLimiter
    adopt_fork: Callable[[AgentActor, str], Awaitable[AgentActor]]


class AgentActor(Actor):
    """The actor behind an ``Agent`` handle."""

    def __init__(self, agent_id: str, state: AgentState, services: Services, mailbox: int) -> None:
        super().__init__(f"agent {agent_id!r}", mailbox)
        self.agent_id = agent_id
        self.state = state
        self._services = services
        self.cached = services.storage.kv.covered(agent_id)
        self.deactivated = False
        """Set when the runtime retired this actor for being idle; handles activate anew."""
        self.successor: AgentActor | None = None
        """The actor that took over this agent after this one was retired."""
        self.deleted = False
        """Set by ``Runtime.delete``: what it refused or cancelled answers AgentNotFoundError."""
        self.last_active = anyio.current_time()
        self.renderer = services.renderer
        self.tokens_generated = 0
        self.tokens_prefilled = 0
        self.tokens_reused = 0

    def _refusal(self) -> TroupeError:
        if self.deleted:
            return AgentNotFoundError(f"agent {self.agent_id!r} was deleted")
        return super()._refusal()

    async def handle(self, message: Request[Any]) -> Any:
        try:
            return await self._handle(message)
        finally:
            self.last_active = anyio.current_time()

    async def _handle(self, message: Request[Any]) -> Any:
        if isinstance(message, Turn):
            try:
                return await self._turn(message)
            finally:
                if message.deltas is not None:
                    message.deltas.close()
        if isinstance(message, Fork):
            return await self._services.adopt_fork(self, message.new_id)
        if isinstance(message, Tell):
            told = Message("user", message.text)
            try:
                await self._commit([told], turn=False)
            except StoreError as exc:
                # Nobody waits for a tell: keep it, and store it with the next commit.
                self.state.transcript.append(told)
                logger.warning("agent %r: a told message is kept in memory until the next "
                               "commit: %s", self.agent_id, exc)
            return None
        raise TypeError(f"an agent cannot handle {message!r}")

    def _messages(self, extra: list[Message]) -> list[dict[str, str]]:
        return chat_messages(self.state.system, [*self.state.transcript, *extra])

    async def _turn(self, turn: Turn) -> Reply:
        services = self._services
        new = turn.new_messages
        tools = [t.describe() for t in turn.tools] or None
        prompt = await services.renderer.render(self._messages(new), turn.new_chars, tools)
        needed = len(prompt) + turn.sampling.max_tokens
        limit = services.info.context_length
        if needed > limit:
            raise ContextLengthError(
                f"agent {self.agent_id!r}: {len(prompt)} prompt tokens + max_tokens "
                f"{turn.sampling.max_tokens} = {needed} exceeds the model's context of {limit}",
                needed=needed, limit=limit,
            )
        matcher = None
        if turn.constraint is not None:
            # Off the loop and before any KV is pinned: a grammar new to the runtime is
            # compiled against the tokenizer here, once (grammars.counters says how long).
            grammars = services.engine.grammars
            assert grammars is not None
            matcher = await anyio.to_thread.run_sync(grammars.matcher, turn.constraint)
        while True:
            # Admitted turns are those the engine can take soon: only they pin KV.
            await services.admission.acquire()
            try:
                lease = await self._checkout(tuple(prompt))
                if lease.wait is None:
                    return await self._run(turn, new, prompt, lease, matcher)
            finally:
                services.admission.release()
            # Another turn is computing the blocks this prompt goes on with: wait for them,
            # outside the admission, rather than prefill the same tokens twice.
            await lease.wait.wait()

    async def _checkout(self, prompt: tuple[int, ...]) -> TurnLease:
        """The KV this turn starts from, pinned until its Commit: at once when every
        block the prompt needs is in memory (a hot turn: a call to the KV manager), else the
        storage asks the catalog first (shielded: what comes back is pinned)."""
        storage = self._services.storage
        found = storage.kv.lookup(self.agent_id, prompt)
        if found is not None:
            return found
        with anyio.CancelScope(shield=True):
            checked = await storage.call(Checkout(self.agent_id, prompt))
        return checked

    async def _run(
        self, turn: Turn, new: list[Message], prompt: list[int], lease: TurnLease,
        matcher: Any,
    ) -> Reply:
        services = self._services
        storage = services.storage
        committed = False
        try:
            if lease.cold:
                # Part of the prefix is on disk: load it here, overlapping other restores.
                await storage.load(self.agent_id)
                with anyio.CancelScope(shield=True):
                    lease = await storage.call(Install(self.agent_id))
            seed = turn.sampling.seed if turn.sampling.seed is not None else secrets.randbits(63)
            # No await between here and following the channel: we hold it to end the turn.
            # The KV goes from its manager to the engine and back through the sink.
            channel = services.engine.start_turn(
                prompt[lease.tokens :], prompt[: lease.tokens],
                storage.kv.sink(self.agent_id), turn.sampling, seed, storage.block_size,
                services.info.persistable_cache, matcher)
            finish, text = await self._follow(channel, turn.deltas)
            if finish.error is not None:
                services.counters.turns_failed += 1
                raise EngineError(f"agent {self.agent_id!r}: the turn failed: {finish.error}") \
                    from finish.error
            if finish.finish_reason == "cancelled":
                # The engine stopped under us: the runtime is closing.
                raise RuntimeClosedError(f"agent {self.agent_id!r}: the runtime closed mid-turn")
            finish_reason: FinishReason = "stop" if finish.finish_reason == "stop" else "length"
            data, calls = self._read(turn, finish, text, finish_reason,
                                     len(prompt) - finish.reused)
            reply = Reply(
                agent_id=self.agent_id,
                text=text,
                tokens=finish.tokens,
                prompt_tokens=len(prompt) - finish.reused,
                cached_tokens=finish.reused,
                finish_reason=finish_reason,
                data=data,
                tool_calls=calls,
            )
            committed = True
            try:
                await self._commit([*new, Message("assistant", reply.text)], turn=True)
            except BaseException:
                services.counters.turns_failed += 1
                raise
        finally:
            if not committed:
                # Failed or cancelled: the KV computed so far (which the engine handed the
                # storage) is still good for its tokens, and the prefix must be unpinned.
                with anyio.CancelScope(shield=True), contextlib.suppress(TroupeError):
                    await self._commit([], turn=False)
        counters = services.counters
        counters.turns_completed += 1
        counters.tokens_generated += len(reply.tokens)
        counters.tokens_prefilled += reply.prompt_tokens
        counters.tokens_reused += reply.cached_tokens
        self.tokens_generated += len(reply.tokens)
        self.tokens_prefilled += reply.prompt_tokens
        self.tokens_reused += reply.cached_tokens
        return reply

    def _read(
        self, turn: Turn, finish: FinishEvent, text: str, reason: FinishReason,
        prompt_tokens: int,
    ) -> tuple[Any, tuple[ToolCall, ...]]:
        """A reply's value and tool calls; IncompleteReplyError (nothing committed) for a
        constrained value that did not complete."""
        constraint = turn.constraint
        data: Any = None
        if constraint is not None and not finish.complete and (
                constraint.kind in ("json", "choices", "regex")
                or (constraint.kind == "tools" and turn.tool_choice != "auto")):
            raise IncompleteReplyError(
                f"agent {self.agent_id!r}: the reply ended ({reason}) before its "
                f"{'tool call' if constraint.kind == 'tools' else 'value'} was complete",
                text=text, tokens=finish.tokens, finish_reason=reason,
                prompt_tokens=prompt_tokens, cached_tokens=finish.reused)
        if constraint is not None and constraint.kind in ("json", "choices", "regex"):
            try:
                data = constraint.read(text)
            except Exception as exc:
                # The grammar makes this all but impossible (a type cattrs cannot make
                # from valid JSON): the caller's error, not one that stops the actor.
                raise ValueError(f"agent {self.agent_id!r}: the reply {text!r} does not "
                                 f"structure into the schema: {exc!r}") from exc
        calls: tuple[ToolCall, ...] = ()
        if turn.tools and turn.tool_choice != "none":
            native = None if constraint is not None else self.renderer.tool_parser
            calls = parse_tool_calls(text, turn.tools, native)
        return data, calls

    async def _follow(
        self, channel: TurnChannel, deltas: MemoryObjectSendStream[str] | None
    ) -> tuple[FinishEvent, str]:
        """Forward the turn's text as it comes, and have the prompt's blocks written once
        prefilled; on cancellation take the turn out first."""
        pieces: list[str] = []
        try:
            async for event in channel.events:
                if isinstance(event, PromptEvent):
                    await self._write_published()
                    continue
                pieces.append(event.text)
                if deltas is not None and event.text:
                    self._forward(deltas, event.text)
                if isinstance(event, FinishEvent):
                    return event, "".join(pieces)
        except BaseException:
            with anyio.CancelScope(shield=True):
                channel.cancel()
                # Until its FinishEvent: by then the engine has handed its KV over.
                async for _ in channel.events:
                    pass
                self._services.counters.turns_cancelled += 1
            raise
        raise EngineError("the engine closed the turn without finishing it")

    async def _write_published(self) -> None:
        """The engine handed the prompt's blocks to the storage (waiting turns went on
        then): have them written while the turn decodes."""
        # Shielded and fire-and-forget: it is queued ahead of this turn's Commit, which
        # writes whatever it did not (so a storage that refuses it loses nothing).
        with anyio.CancelScope(shield=True), contextlib.suppress(TroupeError):
            await self._services.storage.send(WritePublished(self.agent_id))

    @staticmethod
    def _forward(deltas: MemoryObjectSendStream[str], text: str) -> None:
        # If the reader left, the turn still completes and is recorded.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            deltas.send_nowait(text)

    async def _commit(self, messages: list[Message], *, turn: bool) -> None:
        """Persist, then remember: a turn the store refused is not in the transcript.

        Told messages the store refused before go along with this commit.
        """
        state = self.state
        turns = state.turns + 1 if turn else state.turns
        pending = [*state.transcript[state.saved :], *messages]
        commit = Commit(
            agent_id=self.agent_id,
            first_seq=state.saved,
            messages=[(m.role, m.content) for m in pending],
            turns=turns,
        )
        # Shielded: memory and store must agree on whether these messages happened.
        with anyio.CancelScope(shield=True):
            self.cached = await self._services.storage.call(commit)
        state.transcript.extend(messages)
        state.saved = len(state.transcript)
        state.turns = turns

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            agent_id=self.agent_id,
            turns=self.state.turns,
            messages=len(self.state.transcript),
            cached_tokens=self.cached,
            tokens_generated=self.tokens_generated,
            tokens_prefilled=self.tokens_prefilled,
            tokens_reused=self.tokens_reused,
        )


def chat_messages(system: str, transcript: Sequence[Message]) -> list[dict[str, str]]:
    """The conversation for the chat template.

    Consecutive messages of one role (a ``tell`` before a ``say``) are joined: many
    templates insist that user and assistant alternate. Tool results stay apart (templates
    group them themselves).
    """
    messages = [{"role": "system", "content": system}] if system else []
    for m in transcript:
        if messages and messages[-1]["role"] == m.role and m.role != "tool":
            messages[-1]["content"] += "\n\n" + m.content
        else:
            messages.append({"role": m.role, "content": m.content})
    return messages


class Agent:
    """A handle to one agent. Get one from ``Runtime.spawn`` or ``Runtime.get``.

    Methods may be called from any task; an agent's turns run one at a time, in order.
    """

    def __init__(
        self, actor: AgentActor, activate: Callable[[str], Awaitable[AgentActor]]
    ) -> None:
        self._actor = actor
        self._activate = activate

    async def _submit(self, message: Request[R], *, detached: bool = False) -> Pending[R]:
        """Queue ``message`` with the agent's actor, activating the agent again if the
        runtime retired its actor for being idle."""
        while True:
            actor = self._latest()
            if actor.deactivated:
                actor = self._actor = await self._activate(self.id)
            try:
                return await actor.submit(message, detached=detached)
            except RuntimeClosedError:
                if not actor.deactivated:
                    raise

    def _latest(self) -> AgentActor:
        # After idle retirement and activation (maybe through another handle), the agent's
        # state lives in the newest actor; a retired one still holds what the store has.
        while self._actor.successor is not None:
            self._actor = self._actor.successor
        return self._actor

    @property
    def id(self) -> str:
        return self._actor.agent_id

    @property
    def system(self) -> str:
        return self._latest().state.system

    def __repr__(self) -> str:
        return f"<Agent {self.id!r}>"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Agent) and other.id == self.id
                and other._activate == self._activate)

    def __hash__(self) -> int:
        return hash(self.id)

    async def say(
        self,
        text: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        schema: object = None,
        choices: Sequence[str] | None = None,
        regex: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] | None = None,
        tool_choice: str = "auto",
    ) -> Reply:
        """Send the agent a user message and wait for its whole reply.

        Typed replies: ``schema`` (an attrs class, a dataclass, a typing type such as
        ``list[Vote]`` or ``Literal["a", "b"]``, or a JSON Schema dict), ``choices`` (one
        of these strings) or ``regex`` (text that matches it) constrain the decoding;
        ``reply.data`` holds the value. ``tools`` (Tool records or functions) go to the
        model's chat template, and ``reply.tool_calls`` holds the calls the reply makes;
        ``tool_choice``: ``"auto"``, ``"required"``, ``"none"`` or a tool's name.

        Raises ValueError/TypeError for bad arguments (a schema that cannot be compiled
        included), ContextLengthError if the turn cannot fit the context,
        IncompleteReplyError if a constrained reply ran out of ``max_tokens`` before its
        value was whole, RuntimeClosedError after close, AgentFailedError if this agent's
        actor stopped. Cancelling the call cancels the turn: the transcript is left as it
        was.
        """
        turn = self._turn(text, Sampling(max_tokens, temperature, top_p, seed, stop),
                          schema, choices, regex, tools, tool_choice)
        pending = await self._submit(turn)
        return await pending.result()

    async def run(
        self,
        text: str,
        *,
        tools: Sequence[Tool | Callable[..., Any]],
        max_steps: int = 8,
        tool_choice: str = "auto",
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Reply:
        """Run the tool loop: send ``text``, call the tools the reply calls (async ones
        concurrently, sync ones on worker threads), give the model their results as tool
        messages, and take the next turn, until a reply calls no tool or ``max_steps``
        turns were taken. Returns the last reply (its ``tool_calls`` are not empty if
        ``max_steps`` ended the loop).

        ``tool_choice`` applies to the first turn; later turns use ``"auto"`` (so a
        required call does not loop until ``max_steps``). A tool that raises gives an
        error result the model sees (``"error: ValueError: ..."``). Every tool must be a
        function or a Tool with a ``function``.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int):
            raise TypeError(f"max_steps must be an int, got {max_steps!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        sampling = Sampling(max_tokens, temperature, top_p, seed, stop)
        turn = self._turn(text, sampling, None, None, None, tools, tool_choice)
        unrunnable = [t.name for t in turn.tools if t.function is None]
        if unrunnable:
            raise ValueError(f"Agent.run calls its tools: {unrunnable} have no function")
        reply = await (await self._submit(turn)).result()
        steps = 1
        while reply.tool_calls and steps < max_steps:
            results = await call_tools(turn.tools, reply.tool_calls)
            follow = self._turn_with(
                "", sampling, None, turn.tools, "auto", tuple(results))
            reply = await (await self._submit(follow)).result()
            steps += 1
        return reply

    def stream(
        self,
        text: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        schema: object = None,
        choices: Sequence[str] | None = None,
        regex: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] | None = None,
        tool_choice: str = "auto",
    ) -> ReplyStream:
        """Like ``say`` (with the same constraints), but yields the reply's text as it is
        generated.

        ``async for delta in agent.stream(...)``; afterwards ``.reply`` holds the Reply.
        Use ``async with agent.stream(...) as s:`` to cancel the turn on early exit.
        """
        turn = self._turn(text, Sampling(max_tokens, temperature, top_p, seed, stop),
                          schema, choices, regex, tools, tool_choice)
        return ReplyStream(self._submit, turn)

    def _turn(
        self, text: object, sampling: Sampling, schema: object,
        choices: Sequence[str] | None, regex: str | None,
        tools: Sequence[Tool | Callable[..., Any]] | None, tool_choice: str,
        results: Sequence[Message] = (),
    ) -> Turn:
        """The turn ``say``/``stream`` submit. With ``results`` (the HTTP server's, for a
        request that ends with tool results), the turn answers those messages (tool
        results, and any user messages among them, in order) instead of ``text``, as
        ``run`` answers its tools' results; submit it with ``_submit``."""
        message = check_message(text) if not results else ""
        for m in results:
            if not isinstance(m, Message) or m.role not in ("user", "tool"):
                raise TypeError(f"a turn answers user or tool messages, got {m!r}")
            check_str(m.content, f"a {m.role} message")
        constraint = make_constraint(schema, choices, regex)
        made: tuple[Tool, ...] = ()
        if tools is not None:
            made = as_tools(tools)
            tool_choice = check_tool_choice(tool_choice, made)
            if constraint is not None and tool_choice != "none":
                raise ValueError("schema=, choices= and regex= combine with tools= only "
                                 "when tool_choice='none'")
        elif tool_choice != "auto":
            raise ValueError(f"tool_choice {tool_choice!r} needs tools=")
        return self._turn_with(message, sampling, constraint, made, tool_choice,
                               tuple(results))

    def _turn_with(
        self, message: str, sampling: Sampling, constraint: Constraint | None,
        tools: tuple[Tool, ...], tool_choice: str, results: tuple[Message, ...],
    ) -> Turn:
        renderer = self._actor.renderer
        if tools and constraint is None:
            constraint = tool_constraint(tools, tool_choice, renderer.tool_parser is not None)
        turn = Turn(message, sampling, constraint=constraint, tools=tools,
                    tool_choice=tool_choice, results=results)
        # Refuse what cannot possibly fit before anyone spends time tokenizing it.
        renderer.check_length(self.id, turn.new_chars, sampling.max_tokens)
        return turn

    async def tell(self, text: str) -> None:
        """Add a user message to the transcript without asking for a reply.

        Fire-and-forget: it is queued behind the agent's turns and read at its next turn.
        ContextLengthError if the message, with the system prompt, leaves no room for a
        reply (a transcript that grows past the context fails later turns instead).
        """
        message = check_message(text)
        system = self._actor.state.system
        await self._actor.renderer.check_fits(
            self.id, chat_messages(system, [Message("user", message)]), len(message)
        )
        await self._submit(Tell(message), detached=True)

    async def fork(self, new_id: str) -> Agent:
        """A new agent with this one's system prompt, transcript and KV blocks (no KV is
        copied); the two diverge from their next turns.

        Queued behind this agent's turns, so it forks what they leave. AgentExistsError if
        the id is taken.
        """
        check_id(new_id)
        pending = await self._submit(Fork(new_id))
        return Agent(await pending.result(), self._activate)

    def transcript(self) -> tuple[Message, ...]:
        """The conversation so far, oldest first (the system prompt not included)."""
        return tuple(self._latest().state.transcript)

    def statistics(self) -> AgentStatistics:
        """A snapshot of this agent's counters."""
        return self._latest().statistics()


class ReplyStream:
    """The text of one turn as it is generated; ``reply`` is set once it ends."""

    def __init__(
        self, submit: Callable[[Turn], Awaitable[Pending[Reply]]], turn: Turn
    ) -> None:
        self._submit = submit
        self._turn = turn
        self._pending: Pending[Reply] | None = None
        self._deltas: MemoryObjectReceiveStream[str] | None = None
        self.reply: Reply | None = None

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._pending is None:
            send, self._deltas = anyio.create_memory_object_stream[str](math.inf)
            self._pending = await self._submit(attrs.evolve(self._turn, deltas=send))
        assert self._deltas is not None
        try:
            return await self._deltas.receive()
        except anyio.EndOfStream:
            pass
        except BaseException:
            await self._pending.settle()
            raise
        self.reply = await self._pending.result()
        raise StopAsyncIteration

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the turn if it is still running, and wait until it is settled."""
        if self._deltas is not None:
            self._deltas.close()
        if self._pending is not None and self.reply is None:
            await self._pending.settle()
