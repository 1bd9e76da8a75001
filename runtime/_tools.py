"""Tools: their records, their schemas, the tool-call format, and calling them.

A tool is a ``Tool(name, description, parameters_schema)`` record or a Python callable (its
parameters' type hints and its docstring describe it). Tools go to the model's chat
template as OpenAI-style function descriptions. troupe's own tool-call format, which it
constrains a reply to when a call is required, is Hermes/Qwen's JSON one::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, separated by a newline.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import anyio
import anyio.to_thread
import attrs
import cattrs

from ._records import Message, ToolCall
from ._schema import Constraint, _schema, json_schema, lark_constraint

ToolChoice = Literal["auto", "required", "none"] | str
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_converter = cattrs.Converter()


def _to_schema(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"parameters_schema must be a JSON Schema dict, got {value!r}")
    return json_schema(value)


@attrs.frozen
class Tool:
    """A tool the model may call: its ``name`` (1-64 letters, digits, ``_ . -``), a
    ``description`` and the JSON Schema of its arguments (an object). ``function``, if
    given, is what ``Agent.run`` calls with the arguments (sync or async)."""

    name: str
    description: str
    parameters_schema: dict[str, Any] = attrs.field(converter=_to_schema)
    function: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"a tool's name must be 1-64 letters, digits, '_', '.' or '-', "
                             f"got {self.name!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"a tool's description must be a string, got {self.description!r}")

    @classmethod
    def from_function(cls, function: Callable[..., Any]) -> Tool:
        """The tool of a Python function: its name, its docstring's first paragraph, and
        a schema from its parameters' type hints (a parameter with a default is optional)."""
        name = getattr(function, "__name__", None)
        if not isinstance(name, str):
            raise TypeError(f"a tool must be a Tool or a named function, got {function!r}")
        hints = typing.get_type_hints(function)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            properties[param.name] = _schema(hints.get(param.name, Any), ())
            if param.default is param.empty:
                required.append(param.name)
        doc = inspect.getdoc(function) or ""
        description = doc.split("\n\n")[0].strip()
        schema = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": False}
        return cls(name, description, schema, function)

    def describe(self) -> dict[str, Any]:
        """The OpenAI-style function description chat templates take in ``tools=``."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": self.parameters_schema}}


def as_tools(tools: object) -> tuple[Tool, ...]:
    """``tools=`` as Tool records. TypeError/ValueError for what is not a tool, a name
    given twice, or an empty list."""
    if isinstance(tools, Tool | str) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of Tool records or functions, got {tools!r}")
    made = tuple(t if isinstance(t, Tool) else Tool.from_function(t) for t in tools)
    if not made:
        raise ValueError("tools must not be empty")
    names = [t.name for t in made]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return made


def check_tool_choice(choice: object, tools: tuple[Tool, ...]) -> str:
    if not isinstance(choice, str):
        raise TypeError(f"tool_choice must be a string, got {choice!r}")
    if choice not in ("auto", "required", "none") and choice not in {t.name for t in tools}:
        raise ValueError(f"tool_choice must be 'auto', 'required', 'none' or a tool's name, "
                         f"got {choice!r}")
    return choice


def tool_calls_text(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Calls as troupe's format writes them: the text a required call is constrained to
    (``tool_constraint``: compact JSON, ``name`` then ``arguments``), so that calls a
    client sends back (the HTTP server's resent assistant messages) render as the model
    wrote them."""
    return "\n".join(
        f"{TOOL_CALL_START}\n"
        + json.dumps({"name": name, "arguments": dict(arguments)}, separators=(",", ":"),
                     ensure_ascii=False)
        + f"\n{TOOL_CALL_END}" for name, arguments in calls)


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters_schema},
            "required": ["name", "arguments"], "additionalProperties": False}


# Free text that never opens a tool call.
_TEXT = "TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/"


def tool_constraint(tools: tuple[Tool, ...], choice: str, native: bool) -> Constraint | None:
    """The constraint of a turn with tools: ``required``: one call, or as many as there
    are tools; a tool's name: one call of that tool; in troupe's format; ``none``: text
    that calls none; ``auto``: nothing where the model's template has a tool-call parser
    of mlx-lm's (``native``), else either text or calls in troupe's format."""
    if choice == "auto" and native:
        return None
    if choice == "none":
        return lark_constraint("text", "start: TEXT\n" + _TEXT, "the tool choice")
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    schemas = [_call_schema(t) for t in chosen]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = {**body, "x-guidance": {"whitespace_flexible": False}}
    # At most one call per tool given (one for a named tool), so a model that keeps
    # calling cannot loop until max_tokens.
    calls = "call" + "".join('("\\n" call' for _ in chosen[1:]) + ")?" * (len(chosen) - 1)
    lark = (f"calls: {calls}\n"
            f"call: \"{TOOL_CALL_START}\\n\" %json {json.dumps(body)} \"\\n{TOOL_CALL_END}\"\n")
    if choice == "auto":
        return lark_constraint("tools", "start: TEXT | calls\n" + _TEXT + "\n" + lark,
                               "the tools")
    return lark_constraint("tools", "start: calls\n" + lark, "the tools")


def parse_tool_calls(
    text: str, tools: tuple[Tool, ...], native: tuple[Any, str, str] | None,
) -> tuple[ToolCall, ...]:
    """The calls in a reply's text: with mlx-lm's parser for the model's format where it
    has one (``native``: parse, start, end), else troupe's format. A call that does not
    parse, or names no tool given, is left as text."""
    parse, start, end = native if native is not None else (None, TOOL_CALL_START, TOOL_CALL_END)
    known = {t.name for t in tools}
    calls: list[ToolCall] = []
    # A format with no end marker (Mistral's) runs to the next start or the reply's end.
    bodies = (re.findall(re.escape(start) + r"(.*?)" + re.escape(end), text, re.DOTALL)
              if end else text.split(start)[1:])
    for body in bodies:
        try:
            found = parse(body, [t.describe() for t in tools]) if parse else json.loads(body)
        except Exception:
            continue
        for call in found if isinstance(found, list) else [found]:
            if not isinstance(call, Mapping) or call.get("name") not in known:
                continue
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    continue
            if isinstance(arguments, Mapping):
                calls.append(ToolCall(f"call_{secrets.token_hex(6)}", str(call["name"]),
                                      dict(arguments)))
    return tuple(calls)


def _result_text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(_converter.unstructure(value))
    except (TypeError, ValueError):
        return str(value)


async def _call(tool: Tool, call: ToolCall) -> str:
    function = tool.function
    assert function is not None
    try:
        hints = typing.get_type_hints(function)
        arguments = {k: _converter.structure(v, hints[k]) if k in hints else v
                     for k, v in call.arguments.items()}
        if inspect.iscoroutinefunction(function):
            result = await function(**arguments)
        else:
            result = await anyio.to_thread.run_sync(lambda: function(**arguments))
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:
        # The model sees what went wrong, and may try again.
        return f"error: {type(exc).__name__}: {exc}"
    return _result_text(result)


async def call_tools(tools: tuple[Tool, ...], calls: tuple[ToolCall, ...]) -> list[Message]:
    """Run the calls (async tools concurrently, sync ones on worker threads) and return
    their results as tool messages, in the calls' order. A tool that raises gives an
    error result."""
    by_name = {t.name: t for t in tools}
    results = [""] * len(calls)

    async def one(i: int, call: ToolCall) -> None:
        results[i] = await _call(by_name[call.name], call)

    async with anyio.create_task_group() as group:
        for i, call in enumerate(calls):
            group.start_soon(one, i, call)
    return [Message("tool", r) for r in results]
