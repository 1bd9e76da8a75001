"""From an API request to troupe's turns, in one place: who speaks (a named agent, or a
short-lived one holding the request's conversation), what it is told, how it samples,
and which troupe errors become which HTTP statuses.

Tools, tool results and structured output (``response_format``) are refused here with a
400 until troupe's Python API has typed replies and tools; wiring them is this module's
job then.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import attrs

from .. import (
    Agent,
    AgentExistsError,
    AgentFailedError,
    AgentNotFoundError,
    ContextLengthError,
    Message,
    Reply,
    ReplyStream,
    Runtime,
    RuntimeClosedError,
    Sampling,
    TroupeError,
)
from ._errors import ApiError, unsupported


@attrs.frozen
class Conversation:
    """What one request asks: ``history`` then ``told`` then ``last`` (the message the
    reply answers). ``agent_id``: speak as that agent (it has its own history; only
    ``told`` and ``last`` are sent to it)."""

    system: str
    history: tuple[Message, ...]
    told: tuple[str, ...]
    last: str
    agent_id: str | None = None


def split_turn(
    system: str, messages: Sequence[Message], agent_id: str | None, param: str = "messages"
) -> Conversation:
    """The request's messages as a conversation: they must end with a user message; the
    user messages after the last assistant one are what is new."""
    if not messages or messages[-1].role != "user":
        raise ApiError(400, f"{param}: the last message must be the user's", param=param,
                       code="invalid_value")
    first_new = len(messages)
    while first_new > 0 and messages[first_new - 1].role == "user":
        first_new -= 1
    new = [m.content for m in messages[first_new:]]
    return Conversation(system, tuple(messages[:first_new]), tuple(new[:-1]), new[-1],
                        agent_id)


def sampling(
    max_tokens: int, temperature: float, top_p: float, seed: int | None,
    stop: str | Sequence[str] | None, param: str = "stop",
) -> Sampling:
    try:
        return Sampling(max_tokens, temperature, top_p, seed, stop)
    except (TypeError, ValueError) as exc:
        # Sampling's messages start with the field's name.
        field = str(exc).split(" ", 1)[0]
        if field in ("max_tokens", "temperature", "top_p", "seed"):
            param = field
        raise ApiError(400, str(exc), code="invalid_value", param=param) from None


def _key(system: str, messages: Sequence[Message]) -> bytes:
    return hashlib.sha256(json.dumps(
        [system, [(m.role, m.content) for m in messages]]).encode()).digest()


class Conversations:
    """Who answers requests: named agents, and the short-lived agents of stateless ones.

    A short-lived agent outlives its request, idle, keyed by the conversation it holds (its
    system prompt and transcript, the reply included): a client that resends the
    conversation with a new message gets that agent back, so its turn starts from the
    agent's own KV, partial last block included. Otherwise a new one is made, whose turn
    still reuses every full block any agent computed for the same tokens. At most
    ``capacity`` are kept, the least recently used deleted first; the store never hears of
    them.
    """

    def __init__(self, rt: Runtime, capacity: int) -> None:
        self.rt = rt
        self.capacity = capacity
        self._idle: collections.OrderedDict[bytes, Agent] = collections.OrderedDict()
        self.resumed = 0

    @property
    def kept(self) -> int:
        return len(self._idle)

    def _take(self, system: str, history: Sequence[Message]) -> Agent | None:
        agent = self._idle.pop(_key(system, history), None)
        if agent is not None:
            self.resumed += 1
        return agent

    async def _keep(self, agent: Agent, system: str) -> None:
        key = _key(system, agent.transcript())
        twin = self._idle.pop(key, None)
        if twin is not None:
            # Two requests made the same conversation: one agent is enough.
            await self._delete(twin)
        self._idle[key] = agent
        while len(self._idle) > self.capacity:
            _, old = self._idle.popitem(last=False)
            await self._delete(old)

    async def _delete(self, agent: Agent) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(TroupeError):
            await self.rt._delete(agent.id)

    async def aclose(self) -> None:
        while self._idle:
            await self._delete(self._idle.popitem()[1])

    @contextlib.asynccontextmanager
    async def speaker(self, conversation: Conversation) -> AsyncIterator[Agent]:
        """The agent that answers: the named one (told the new messages first), or a
        short-lived one holding the conversation, kept if its turn completes."""
        rt = self.rt
        if conversation.agent_id is not None:
            named = await rt.get(conversation.agent_id)
            for text in conversation.told:
                await named.tell(text)
            yield named
            return
        system = conversation.system
        agent = self._take(system, conversation.history)
        if agent is None:
            history = list(conversation.history)
            history += [Message("user", text) for text in conversation.told]
            agent = await rt._spawn_with(None, system, history)
        else:
            for text in conversation.told:
                await agent.tell(text)
        turns = agent.statistics().turns
        kept = False
        try:
            yield agent
            kept = agent.statistics().turns == turns + 1
        finally:
            with anyio.CancelScope(shield=True):
                if kept and not rt.closed:
                    await self._keep(agent, system)
                else:
                    await self._delete(agent)


async def say(speakers: Conversations, conversation: Conversation, options: Sampling) -> Reply:
    async with speakers.speaker(conversation) as agent:
        return await agent.say(conversation.last, max_tokens=options.max_tokens,
                               temperature=options.temperature, top_p=options.top_p,
                               seed=options.seed, stop=options.stop)


@attrs.define
class OpenStream:
    """A turn whose first delta has come (so that its errors were HTTP statuses): the
    rest follows from ``stream``; ``aclose`` (once, however often called) cancels it if
    unfinished and cleans up."""

    first: str | None
    stream: ReplyStream
    _stack: contextlib.AsyncExitStack
    _on_close: Callable[[], None]
    _closed: bool = False

    async def rest(self) -> AsyncIterator[str]:
        if self.first is None:
            return
        yield self.first
        async for delta in self.stream:
            yield delta

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()
        finally:
            self._on_close()


async def open_stream(
    speakers: Conversations, conversation: Conversation, options: Sampling,
    on_close: Callable[[], None],
) -> OpenStream:
    """The turn, started, and its first delta; ``on_close`` runs when it is closed (not
    if this raises)."""
    stack = contextlib.AsyncExitStack()
    try:
        agent = await stack.enter_async_context(speakers.speaker(conversation))
        stream = await stack.enter_async_context(agent.stream(
            conversation.last, max_tokens=options.max_tokens, temperature=options.temperature,
            top_p=options.top_p, seed=options.seed, stop=options.stop))
        try:
            first: str | None = await stream.__anext__()
        except StopAsyncIteration:
            first = None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    return OpenStream(first, stream, stack, on_close)


def usage_numbers(reply: Reply) -> tuple[int, int, int]:
    """(prompt tokens in all, of which reused from cache, generated)."""
    return reply.prompt_tokens + reply.cached_tokens, reply.cached_tokens, len(reply.tokens)


def api_error(exc: BaseException) -> ApiError | None:
    """The status a troupe error means to a client; None for what is not troupe's."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, f"{exc} (the model's context is {exc.limit} tokens)",
                        code="context_length_exceeded", param="messages")
    if isinstance(exc, AgentNotFoundError):
        return ApiError(404, str(exc).strip("'\""), code="agent_not_found")
    if isinstance(exc, AgentExistsError):
        return ApiError(409, str(exc), code="agent_exists")
    if isinstance(exc, RuntimeClosedError):
        return ApiError(503, "the server is shutting down", code="shutting_down",
                        retry_after=1.0)
    if isinstance(exc, AgentFailedError | TroupeError):
        return ApiError(500, f"the turn failed: {exc}", code="server_error")
    if isinstance(exc, ValueError | TypeError):
        return ApiError(400, str(exc), code="invalid_value")
    return None


# -- typed replies and tools: where issue 19's Python API gets wired in ----------------------
#
# Each API's tools, tool_choice and structured-output fields are read here, and nowhere
# else. Until troupe's agents take ``schema=``, ``tools=`` and ``tool_choice=`` (and
# ``Message(role="tool")``), a request that uses them is refused with a 400 in the API's
# shape. Wiring them means: return the translated arguments from these functions, pass
# them to ``Agent.say``/``stream`` in ``say``/``open_stream``, accept tool messages and
# tool_use/tool_result blocks in ``text_of``'s callers, and render ``reply.tool_calls``.

def structured_openai(body: dict[str, Any]) -> None:
    """OpenAI's ``tools``, ``functions``, ``tool_choice``, ``response_format`` and the
    Responses API's ``text.format``."""
    if body.get("tools"):
        raise unsupported("tools", "tools")
    if body.get("functions"):
        raise unsupported("functions", "functions")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tool_choice")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise ApiError(400, "response_format must be an object", param="response_format",
                           code="invalid_value")
        if response_format.get("type") not in (None, "text"):
            raise unsupported(f"response_format {response_format.get('type')!r}",
                              "response_format")
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise unsupported(f"text.format {fmt.get('type')!r}", "text")


def structured_anthropic(body: dict[str, Any]) -> None:
    """Anthropic's ``tools`` and ``tool_choice`` (tool_use/tool_result blocks: ``text_of``)."""
    if body.get("tools"):
        raise unsupported("tools", "tools")
    if body.get("tool_choice") is not None:
        raise unsupported("tool_choice", "tool_choice")


def structured_agents(body: dict[str, Any]) -> None:
    """The agents API's ``schema``, ``tools`` and ``tool_choice`` on a turn."""
    for feature in ("schema", "tools", "tool_choice"):
        if body.get(feature) is not None:
            raise unsupported(feature, feature)


def text_of(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (OpenAI's and Anthropic's shape)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError(400, f"{param}[{i}]: a content part must be an object with a "
                               "type", param=param, code="invalid_value")
            kind = part["type"]
            if kind in ("text", "input_text", "output_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise ApiError(400, f"{param}[{i}].text must be a string", param=param,
                                   code="invalid_value")
                texts.append(text)
            elif kind in ("tool_use", "tool_result", "function_call",
                          "function_call_output"):
                raise ApiError(400, f"{param}[{i}]: {kind} content is not supported by this "
                               "server yet", param=param, code="unsupported")
            else:
                raise ApiError(400, f"{param}[{i}]: content of type {kind!r} is not "
                               "supported (text only)", param=param, code="unsupported")
        return "".join(texts)
    raise ApiError(400, f"{param}: content must be a string or an array of text parts",
                   param=param, code="invalid_value")
