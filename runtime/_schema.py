"""What a constrained turn asks for: a JSON Schema from a Python type, and a value back.

``json_schema(X)`` turns an attrs class, a dataclass, a ``typing`` type (``list[Vote]``,
``Literal["north", "south"]``, ``int | None``...) or a JSON Schema dict into the JSON Schema
the grammar engine compiles; ``structure(value, X)`` makes the parsed JSON into ``X`` with
cattrs. ``Constraint`` is the grammar of one turn, with how to read its reply back.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import cattrs

ConstraintKind = Literal["json", "choices", "regex", "tools", "text"]

_converter = cattrs.Converter()


def _fields(cls: type) -> list[tuple[str, Any, bool]]:
    """(name, type, required) of an attrs class's or a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    if attrs.has(cls):
        return [(f.name, hints.get(f.name, f.type), f.default is attrs.NOTHING)
                for f in attrs.fields(cls) if f.init]
    return [(f.name, hints.get(f.name, f.type),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls) if f.init]


def _schema(tp: Any, seen: tuple[type, ...]) -> dict[str, Any]:
    if tp is Any:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin is typing.Union or origin is types.UnionType:
        return {"anyOf": [_schema(a, seen) for a in args]}
    if origin in (list, Sequence, set, frozenset) or tp in (list, set, frozenset):
        item = _schema(args[0], seen) if args else {}
        return {"type": "array", "items": item}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0], seen)}
        return {"type": "array", "prefixItems": [_schema(a, seen) for a in args],
                "minItems": len(args), "maxItems": len(args), "items": False}
    if origin in (dict, Mapping) or tp is dict:
        if args and args[0] is not str:
            raise TypeError(f"a schema's mapping keys must be str, got {args[0]!r}")
        return {"type": "object", "additionalProperties": _schema(args[1], seen) if args else {}}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and (attrs.has(tp) or dataclasses.is_dataclass(tp)):
        if tp in seen:
            raise TypeError(f"a recursive type cannot be a schema: {tp.__name__}")
        fields = _fields(tp)
        return {
            "type": "object",
            "properties": {name: _schema(t, (*seen, tp)) for name, t, _ in fields},
            "required": [name for name, _, required in fields if required],
            "additionalProperties": False,
        }
    raise TypeError(f"cannot make a JSON Schema of {tp!r}: use an attrs class, a dataclass, "
                    "a typing type or a JSON Schema dict")


def json_schema(schema: object) -> dict[str, Any]:
    """The JSON Schema of ``schema``: a dict is taken as one already; a type is described.

    TypeError for what troupe cannot describe (a recursive class, non-str mapping keys).
    """
    if isinstance(schema, Mapping):
        try:
            return dict(json.loads(json.dumps(schema)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a JSON Schema dict must be JSON: {exc}") from exc
    return _schema(schema, ())


def structure(value: Any, schema: object) -> Any:
    """``value`` (parsed JSON) made into ``schema`` when it is a type; as it is otherwise."""
    if isinstance(schema, Mapping):
        return value
    return _converter.structure(value, schema)  # type: ignore[arg-type]


@attrs.frozen
class Constraint:
    """One turn's grammar (an llguidance grammar string) and how to read its reply.

    ``key`` identifies the grammar for the compiled-grammar cache: the same schema, choices
    or regex used by many agents compiles once.
    """

    kind: ConstraintKind
    grammar: str = attrs.field(repr=False)
    key: str
    target: object = attrs.field(default=None, eq=False, repr=False)
    """The schema the caller passed (a type is structured into; a dict is not)."""

    def read(self, text: str) -> Any:
        """The reply's value: parsed JSON (structured into a type), or the text itself.

        ValueError if the text does not parse (which the grammar makes impossible).
        """
        if self.kind == "json":
            return structure(json.loads(text), self.target)
        return text


def _grammar_from_json_schema(schema: dict[str, Any]) -> str:
    import llguidance

    # Compact JSON: no whitespace for a random (or wandering) model to spend tokens on.
    options: Any = {"whitespace_flexible": False}
    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    return grammar


def _grammar_from_lark(lark: str) -> str:
    import llguidance

    grammar: str = llguidance.LLMatcher.grammar_from_lark(lark)
    return grammar


def _grammar_from_regex(regex: str) -> str:
    import llguidance

    grammar: str = llguidance.LLMatcher.grammar_from_regex(regex)
    return grammar


def _check(grammar: str, what: str) -> None:
    import llguidance

    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise ValueError(f"{what} cannot be compiled: {messages[0] if messages else '?'}")


def make_constraint(
    schema: object = None, choices: Sequence[str] | None = None, regex: str | None = None,
) -> Constraint | None:
    """The constraint of a turn's ``schema=``, ``choices=`` or ``regex=`` (at most one).

    ValueError for a schema, a list of choices or a regular expression the grammar engine
    cannot compile; TypeError for a type troupe cannot describe.
    """
    given = [name for name, v in (("schema", schema), ("choices", choices), ("regex", regex))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of schema=, choices=, regex=; got {given}")
    if schema is not None:
        described = json_schema(schema)
        key = "json:" + json.dumps(described, sort_keys=True)
        grammar = _cached(key, lambda: _grammar_from_json_schema(described), "the schema")
        return Constraint("json", grammar, key, schema)
    if choices is not None:
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise TypeError(f"choices must be a list of strings, got {choices!r}")
        options = list(choices)
        if not options or not all(isinstance(c, str) and c for c in options):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(c) for c in options)
        key = "choices:" + json.dumps(options)
        return Constraint("choices", _cached(key, lambda: _grammar_from_lark(lark), "choices"),
                          key)
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise TypeError(f"regex must be a non-empty string, got {regex!r}")
        key = "regex:" + regex
        return Constraint("regex", _cached(key, lambda: _grammar_from_regex(regex), "the regex"),
                          key)
    return None


def lark_constraint(kind: ConstraintKind, lark: str, what: str) -> Constraint:
    """A constraint from a Lark grammar of troupe's own (tool calls)."""
    key = f"{kind}:" + lark
    return Constraint(kind, _cached(key, lambda: _grammar_from_lark(lark), what), key)


_GRAMMARS: dict[str, str] = {}
"""Checked grammars by key: a grammar is built and validated once per process."""
_GRAMMARS_KEPT = 1024


def _cached(key: str, build: Callable[[], str], what: str) -> str:
    grammar = _GRAMMARS.get(key)
    if grammar is None:
        try:
            grammar = build()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} cannot be compiled: {exc}") from exc
        _check(grammar, what)
        if len(_GRAMMARS) >= _GRAMMARS_KEPT:
            _GRAMMARS.pop(next(iter(_GRAMMARS)))
        _GRAMMARS[key] = grammar
    return grammar
