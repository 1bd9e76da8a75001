"""From an API request to troupe's turns, in one place: who speaks (a named agent, or a
short-lived one holding the request's conversation), what it is told, how it samples,
and which troupe errors become which HTTP statuses.

Tools, tool results and structured output map onto troupe's typed replies and tools
(``Agent.say(schema=, tools=, tool_choice=)``): each API's fields become a ``Structure``
(the parsers live here too), a request that ends with tool results becomes a turn that
answers them, and the calls in a reply are told apart from its text here.
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
    IncompleteReplyError,
    Message,
    Reply,
    ReplyStream,
    Runtime,
    RuntimeClosedError,
    Sampling,
    Tool,
    ToolCall,
    TroupeError,
)
from .._records import FinishReason
from .._schema import make_constraint
from .._tools import TOOL_CALL_START, tool_calls_text
from ..actors._agent import Turn
from ._errors import ApiError, unsupported


@attrs.frozen
class Conversation:
    """What one request asks: ``history`` then ``told`` then ``last`` (the message the
    reply answers), or, when ``results`` is not empty, ``history`` then the turn answering
    ``results`` (tool results, and any user messages among them; ``told`` and ``last``
    are empty then). ``agent_id``: speak as that agent (it has its own history; only
    ``told`` and ``last``, or ``results``, are sent to it)."""

    system: str
    history: tuple[Message, ...]
    told: tuple[str, ...]
    last: str
    agent_id: str | None = None
    results: tuple[Message, ...] = ()


def split_turn(
    system: str, messages: Sequence[Message], agent_id: str | None, param: str = "messages"
) -> Conversation:
    """The request's messages as a conversation: they must end with a user message or a
    tool result; the messages after the last assistant one are what is new. New user
    messages only: all but the last are told, the last is the turn; new tool results
    (maybe with user messages): the turn answers them all, as ``Agent.run`` answers its
    tools' results."""
    if not messages or messages[-1].role not in ("user", "tool"):
        raise ApiError(400, f"{param}: the last message must be the user's or a tool "
                       "result", param=param, code="invalid_value")
    first_new = len(messages)
    while first_new > 0 and messages[first_new - 1].role in ("user", "tool"):
        first_new -= 1
    history = tuple(messages[:first_new])
    if any(m.role == "tool" for m in messages[first_new:]):
        return Conversation(system, history, (), "", agent_id, tuple(messages[first_new:]))
    new = [m.content for m in messages[first_new:]]
    return Conversation(system, history, tuple(new[:-1]), new[-1], agent_id)


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
    def call_starts(self) -> tuple[str, ...]:
        """The markers a tool call starts with: troupe's format (a constrained call), and
        the model's own where mlx-lm has a parser for it (a free one)."""
        native = self.rt._services.renderer.tool_parser
        return tuple({TOOL_CALL_START, *([native[1]] if native and native[1] else [])})

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


@attrs.frozen
class Structure:
    """What a request constrains its turn to: a JSON Schema (``response_format``,
    ``text.format``), tools without functions (the client calls them) and the tool
    choice (``"auto"``, ``"required"``, ``"none"`` or a tool's name)."""

    schema: dict[str, Any] | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    choices: tuple[str, ...] | None = None
    """The agents API's ``choices`` and ``regex`` (as ``Agent.say``'s)."""
    regex: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the reply can only be tool calls."""
        return bool(self.tools) and self.tool_choice not in ("auto", "none")

    @property
    def calls(self) -> bool:
        """Whether the reply may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"


FREE = Structure()


def _turn(agent: Agent, conversation: Conversation, options: Sampling,
          structure: Structure) -> Turn:
    return agent._turn(conversation.last, options, structure.schema, structure.choices,
                       structure.regex, structure.tools or None, structure.tool_choice,
                       conversation.results)


def incomplete_reply(agent: Agent, exc: IncompleteReplyError) -> Reply:
    """A constrained reply that ``max_tokens`` (or a stop string) cut before its value was
    whole, as the APIs report it: the partial text, finished by ``length`` (or ``stop``),
    with no value and no calls (troupe committed nothing)."""
    reason: FinishReason = "stop" if exc.finish_reason == "stop" else "length"
    return Reply(agent_id=agent.id, text=exc.text, tokens=exc.tokens,
                 prompt_tokens=exc.prompt_tokens, cached_tokens=exc.cached_tokens,
                 finish_reason=reason)


async def say(speakers: Conversations, conversation: Conversation, options: Sampling,
              structure: Structure = FREE) -> Reply:
    async with speakers.speaker(conversation) as agent:
        turn = _turn(agent, conversation, options, structure)
        try:
            return await (await agent._submit(turn)).result()
        except IncompleteReplyError as exc:
            return incomplete_reply(agent, exc)


@attrs.define
class OpenStream:
    """A turn whose first delta has come (so that its errors were HTTP statuses): the
    rest follows from ``stream``; ``aclose`` (once, however often called) cancels it if
    unfinished and cleans up."""

    first: str | None
    stream: ReplyStream
    _agent: Agent
    _stack: contextlib.AsyncExitStack
    _on_close: Callable[[], None]
    _closed: bool = False
    _incomplete: Reply | None = None

    @property
    def reply(self) -> Reply | None:
        """The reply once the deltas ended (an incomplete constrained one included)."""
        return self._incomplete or self.stream.reply

    async def rest(self) -> AsyncIterator[str]:
        if self.first is None:
            return
        yield self.first
        try:
            async for delta in self.stream:
                yield delta
        except IncompleteReplyError as exc:
            self._incomplete = incomplete_reply(self._agent, exc)

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
    on_close: Callable[[], None], structure: Structure = FREE,
) -> OpenStream:
    """The turn, started, and its first delta; ``on_close`` runs when it is closed (not
    if this raises)."""
    stack = contextlib.AsyncExitStack()
    incomplete = None
    try:
        agent = await stack.enter_async_context(speakers.speaker(conversation))
        stream = await stack.enter_async_context(
            ReplyStream(agent._submit, _turn(agent, conversation, options, structure)))
        try:
            first: str | None = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except IncompleteReplyError as exc:
            first, incomplete = None, incomplete_reply(agent, exc)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    return OpenStream(first, stream, agent, stack, on_close, incomplete=incomplete)


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


# -- typed replies and tools: each API's fields as troupe's ``schema=``, ``tools=`` and
# ``tool_choice=``, and the calls of a reply told apart from its text.

def _schema_of(schema: object, param: str) -> dict[str, Any]:
    """A request's JSON Schema, compiled now (and cached: the turn reuses it), so that
    one the grammar engine cannot compile is a 400 before any turn starts."""
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param} must be a JSON Schema object", param=param,
                       code="invalid_value")
    try:
        make_constraint(schema=schema)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_schema") from None
    return schema


def _tool(spec: dict[str, Any], schema_field: str, where: str) -> Tool:
    parameters = spec.get(schema_field)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    description = spec.get("description")
    try:
        tool = Tool(spec.get("name"), "" if description is None else description,  # type: ignore[arg-type]
                    parameters)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"{where}: {exc}", param="tools", code="invalid_value") from None
    _schema_of(tool.parameters_schema, f"{where}.{schema_field}")
    return tool


def _structure(schema: dict[str, Any] | None, tools: list[Tool], choice: str) -> Structure:
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools: names must be unique, got {names}", param="tools",
                       code="invalid_value")
    if not tools:
        if choice not in ("auto", "none"):
            raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice",
                           code="invalid_value")
        return Structure(schema)
    if choice not in ("auto", "none", "required") and choice not in names:
        raise ApiError(400, f"tool_choice names no tool given: {choice!r}",
                       param="tool_choice", code="invalid_value")
    if schema is not None and choice != "none":
        # A reply is constrained to a schema or to tool calls, not to either at once.
        raise ApiError(400, "a response format combines with tools only when tool_choice "
                       "is 'none'", param="tool_choice", code="unsupported")
    return Structure(schema, tuple(tools), choice)


def _openai_format(fmt: object, param: str, *, flat: bool) -> dict[str, Any] | None:
    """``response_format`` (``flat``: the Responses API's ``text.format``) as a schema."""
    if not isinstance(fmt, dict):
        raise ApiError(400, f"{param} must be an object", param=param, code="invalid_value")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _schema_of({"type": "object"}, param)
    if kind == "json_schema":
        spec = fmt if flat else fmt.get("json_schema")
        where = f"{param}.schema" if flat else f"{param}.json_schema.schema"
        if not isinstance(spec, dict):
            raise ApiError(400, f"{param}.json_schema must be an object", param=param,
                           code="invalid_value")
        # ``strict`` or not, the schema is enforced: constrained decoding is all troupe does.
        return _schema_of(spec.get("schema"), where)
    raise unsupported(f"{param} of type {kind!r}", param)


def structured_openai(body: dict[str, Any], *, responses: bool = False) -> Structure:
    """OpenAI's ``tools``, ``tool_choice`` and ``response_format`` (chat completions), or
    ``text.format`` (``responses``: the Responses API, whose tools are flat)."""
    if body.get("functions") or body.get("function_call") is not None:
        raise unsupported("functions (use tools)", "functions")
    schema = None
    if responses:
        text = body.get("text")
        if text is not None and not isinstance(text, dict):
            raise ApiError(400, "text must be an object", param="text", code="invalid_value")
        if text is not None and text.get("format") is not None:
            schema = _openai_format(text["format"], "text.format", flat=True)
    elif body.get("response_format") is not None:
        schema = _openai_format(body["response_format"], "response_format", flat=False)
    given = body.get("tools")
    if given is not None and not isinstance(given, list):
        raise ApiError(400, "tools must be an array", param="tools", code="invalid_value")
    tools = []
    for i, item in enumerate(given or []):
        where = f"tools[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            kind = item.get("type") if isinstance(item, dict) else None
            raise unsupported(f"{where}: tools of type {kind!r} (function tools only)", "tools")
        spec = item if responses else item.get("function")
        if not isinstance(spec, dict):
            raise ApiError(400, f"{where}.function must be an object", param="tools",
                           code="invalid_value")
        tools.append(_tool(spec, "parameters", where))
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        named = choice if responses else choice.get("function")
        choice = named.get("name") if isinstance(named, dict) else None
    if not isinstance(choice, str):
        raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or names a "
                       "function", param="tool_choice", code="invalid_value")
    return _structure(schema, tools, choice)


_ANTHROPIC_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def structured_anthropic(body: dict[str, Any]) -> Structure:
    """Anthropic's ``tools`` (client tools: ``name``, ``description``, ``input_schema``)
    and ``tool_choice`` (``auto``, ``any``: a call is required, ``tool``: that one,
    ``none``)."""
    given = body.get("tools")
    if given is not None and not isinstance(given, list):
        raise ApiError(400, "tools: must be an array", param="tools")
    tools = []
    for i, item in enumerate(given or []):
        where = f"tools.{i}"
        if not isinstance(item, dict) or item.get("type") not in (None, "custom"):
            kind = item.get("type") if isinstance(item, dict) else None
            raise unsupported(f"{where}: tools of type {kind!r} (client tools only)", "tools")
        tools.append(_tool(item, "input_schema", where))
    value = body.get("tool_choice")
    choice = "auto"
    if value is not None:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "tool" and isinstance(value.get("name"), str):
            choice = value["name"]
        elif kind in _ANTHROPIC_CHOICES:
            choice = _ANTHROPIC_CHOICES[kind]
        else:
            raise ApiError(400, "tool_choice: type must be auto, any, tool (with a name) or "
                           "none", param="tool_choice")
    return _structure(None, tools, choice)


def structured_agents(body: dict[str, Any]) -> Structure:
    """The agents API's ``schema`` (a JSON Schema), ``choices``, ``regex``, ``tools``
    (``name``, ``description``, ``parameters``) and ``tool_choice``, as ``Agent.say``
    takes them."""
    schema = body.get("schema")
    if schema is not None:
        schema = _schema_of(schema, "schema")
    choices, regex = body.get("choices"), body.get("regex")
    for name, value in (("choices", choices), ("regex", regex)):
        if value is None:
            continue
        try:
            make_constraint(**{name: value})
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"{name}: {exc}", param=name, code="invalid_value") from None
    given = body.get("tools")
    if given is not None and not isinstance(given, list):
        raise ApiError(400, "tools must be an array", param="tools", code="invalid_value")
    tools = []
    for i, item in enumerate(given or []):
        if not isinstance(item, dict):
            raise ApiError(400, f"tools[{i}] must be an object", param="tools",
                           code="invalid_value")
        tools.append(_tool(item, "parameters", f"tools[{i}]"))
    choice = body.get("tool_choice", "auto")
    if not isinstance(choice, str):
        raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or a tool's name",
                       param="tool_choice", code="invalid_value")
    structure = _structure(schema, tools, choice)
    if (choices is not None or regex is not None) and (
            schema is not None or (tools and choice != "none")):
        raise ApiError(400, "give at most one of schema, choices, regex, or tools with a "
                       "tool_choice other than 'none'", param="schema", code="invalid_value")
    return attrs.evolve(structure, choices=None if choices is None else tuple(choices),
                        regex=regex)


def call_arguments(value: object, where: str, param: str) -> dict[str, Any]:
    """A resent call's arguments: a JSON object, or OpenAI's JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ApiError(400, f"{where}: the arguments must be JSON", param=param,
                           code="invalid_value") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}: the arguments must be a JSON object", param=param,
                       code="invalid_value")
    return value


def call_name(value: object, where: str, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}: a call needs a function name", param=param,
                       code="invalid_value")
    return value


def with_calls(text: str, calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """An assistant message a client sends back, calls included: its text, then its calls
    in troupe's ``<tool_call>`` format (as a constrained call was written, so that a
    resent conversation renders as the model saw it)."""
    return text + tool_calls_text(calls) if calls else text


def reply_text(reply: Reply, starts: Sequence[str]) -> str | None:
    """A reply's text for the client: all of it, or, when it calls tools, what it says
    before its first call (None if that is blank)."""
    if not reply.tool_calls:
        return reply.text
    cut = min((i for i in (reply.text.find(s) for s in starts) if i >= 0),
              default=len(reply.text))
    head = reply.text[:cut]
    return head if head.strip() else None


def arguments_json(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


class CallFilter:
    """A streamed reply's text with its tool calls held back (they go out whole, parsed,
    once the reply is in): text is let through until a call starts, less any tail that
    may be the start of one's marker. A reply that can only be calls lets nothing through;
    what was held back goes out at the end if the reply turns out to call nothing."""

    def __init__(self, structure: Structure, starts: Sequence[str]) -> None:
        self._starts = tuple(starts) if structure.calls else ()
        self._calling = structure.forced
        self._held = ""

    def feed(self, delta: str) -> str:
        if not self._starts:
            return delta
        self._held += delta
        if self._calling:
            return ""
        found = [i for i in (self._held.find(s) for s in self._starts) if i >= 0]
        if found:
            self._calling = True
            out, self._held = self._held[: min(found)], self._held[min(found):]
            return out
        # The longest tail of the text that may begin a marker waits for the next delta.
        keep = max((k for s in self._starts for k in range(1, len(s))
                    if self._held.endswith(s[:k])), default=0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def rest(self, reply: Reply) -> str:
        """What was held back that is text, after all: none if the reply called tools."""
        held, self._held = self._held, ""
        return "" if reply.tool_calls else held


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
                raise ApiError(400, f"{param}[{i}]: {kind} content does not belong here",
                               param=param, code="invalid_value")
            else:
                raise ApiError(400, f"{param}[{i}]: content of type {kind!r} is not "
                               "supported (text only)", param=param, code="unsupported")
        return "".join(texts)
    raise ApiError(400, f"{param}: content must be a string or an array of text parts",
                   param=param, code="invalid_value")
