"""Typed replies and tools on the real embedded model: constrained decoding in the batch.

The embedded model has random weights: with a constraint its replies are still valid
values, which is what these tests rely on. Schemas bound their numbers and strings, so
a wandering model ends its values well within max_tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import json
import re
import weakref
from pathlib import Path
from typing import Any, Literal

import attrs
import jsonschema
import pytest
import trio
import trio.lowlevel

import troupe
from conftest import TINY
from troupe._schema import json_schema


@attrs.frozen
class Vote:
    voter: Literal["ann", "bob", "cy"]
    score: int = attrs.field()
    yes: bool = True


@dataclasses.dataclass
class Place:
    name: Literal["north", "south", "east", "west"]
    open: bool
    tags: list[Literal["old", "new"]]


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


def _s(maxlen: int = 6, minlen: int = 0) -> dict[str, Any]:
    return {"type": "string", "minLength": minlen, "maxLength": maxlen}


def _i(lo: int = 0, hi: int = 99) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS: list[Any] = [
    # strings, lengths, enums, const, patterns
    _s(4), _s(8, 2), _s(1, 1), {"type": "string", "enum": ["a", "bb", "ccc"]},
    {"const": "fixed"}, {"type": "string", "pattern": "^[a-z]{3}[0-9]$"},
    {"type": "string", "format": "date"},
    # numbers and integers with bounds
    _i(), _i(-5, 5), _i(100, 120), {"type": "integer", "enum": [1, 2, 3]},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "minimum": -10, "maximum": 10},
    {"type": "boolean"}, {"type": "null"},
    # arrays: items, min/max items
    {"type": "array", "items": _i(), "maxItems": 3},
    {"type": "array", "items": _s(3), "minItems": 1, "maxItems": 2},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 3, "maxItems": 4},
    {"type": "array", "items": _obj({"k": _i()}), "maxItems": 2},
    # objects: required and optional fields, nesting
    _obj({"a": _i()}), _obj({"a": _s(3), "b": {"type": "boolean"}}),
    _obj({"a": _i(), "b": _s(2)}, required=["a"]),
    _obj({"name": _s(5, 1), "age": _i(0, 120), "tall": {"type": "boolean"}}),
    _obj({"inner": _obj({"x": _i(), "y": _i()})}),
    _obj({"inner": _obj({"deep": _obj({"z": {"enum": [True, False]}})})}),
    _obj({"list": {"type": "array", "items": _i(), "maxItems": 2}, "n": {"type": "null"}}),
    _obj({f"f{i}": _i() for i in range(10)}),  # ten fields, as in the benchmark
    _obj({"pick": {"enum": ["up", "down"]}, "why": _s(6)}),
    _obj({"v": {"anyOf": [_i(), {"type": "boolean"}]}}),
    _obj({"opt": _s(3)}, required=[]),
    {"anyOf": [_obj({"kind": {"const": "a"}}), _obj({"kind": {"const": "b"}, "n": _i()})]},
    _obj({"matrix": {"type": "array", "items": {"type": "array", "items": _i(0, 9),
                                                  "maxItems": 2}, "maxItems": 2}}),
    _obj({"s": {"type": "string", "enum": ["yes", "no"]}, "t": _i(1, 3),
          "u": {"type": "number", "minimum": 0, "maximum": 5}}),
    # Python types
    Vote, Place, list[Vote], Literal["north", "south"], Literal[1, 2, 3], bool,
    list[bool], tuple[bool, Literal["a", "b"]], Colour, bool | None,
    dict[str, bool], list[Literal["x"]], tuple[Colour, ...], Place | None,
    {"type": "array", "items": _obj({"id": _i(), "tag": _s(4)}, required=["id"]),
     "minItems": 1, "maxItems": 2},
    _obj({"when": {"type": "string", "format": "date"}, "ok": {"type": "boolean"}}),
]
assert len(SCHEMAS) == 50


async def test_fifty_schemas_give_values_that_validate_and_structure() -> None:
    replies: dict[int, troupe.Reply] = {}
    async with troupe.open_runtime(model=TINY, max_batch_size=32) as rt:

        async def one(i: int, schema: Any) -> None:
            agent = await rt.spawn(f"s{i}", system="Answer in JSON.")
            replies[i] = await agent.say(f"Value number {i}?", schema=schema, max_tokens=160)

        async with trio.open_nursery() as nursery:
            for i, schema in enumerate(SCHEMAS):
                nursery.start_soon(one, i, schema)
        stats = rt.statistics()
    assert stats.peak_batch_size > 1  # they ran together
    # Each grammar compiled once (bool and {"type": "boolean"} are one).
    distinct = {json.dumps(json_schema(s), sort_keys=True) for s in SCHEMAS}
    assert stats.grammars_compiled == len(distinct)
    assert stats.grammars_reused == len(SCHEMAS) - len(distinct)
    for i, schema in enumerate(SCHEMAS):
        reply = replies[i]
        value = json.loads(reply.text)
        jsonschema.validate(value, json_schema(schema))
        if isinstance(schema, dict):
            assert reply.data == value
        elif (isinstance(schema, type) and attrs.has(schema)) or dataclasses.is_dataclass(schema):
            assert isinstance(reply.data, schema)  # type: ignore[arg-type]
        elif isinstance(schema, type) and issubclass(schema, enum.Enum):
            assert isinstance(reply.data, schema)
    assert all(isinstance(v, Vote) for v in replies[SCHEMAS.index(list[Vote])].data)


async def test_choices_and_regex_always_match() -> None:
    patterns = [r"[0-9]{3}-[a-z]{2}", r"(yes|no), because [a-z]{1,8}\.", r"[A-Z][a-z]{2,5}",
                r"\d{1,2}:\d{2}", r"(ab)+c?"]
    choices = ["north", "south", "east", "west", "stay"]
    async with troupe.open_runtime(model=TINY) as rt:
        agent_ids = [f"r{i}" for i in range(10)]
        agents = [await rt.spawn(a) for a in agent_ids]
        picked: list[troupe.Reply] = []
        matched: list[tuple[str, troupe.Reply]] = []

        async def pick(agent: troupe.Agent, seed: int) -> None:
            picked.append(await agent.say("Where to?", choices=choices, max_tokens=8,
                                          temperature=1.0, seed=seed))

        async def match(agent: troupe.Agent, pattern: str, seed: int) -> None:
            matched.append((pattern, await agent.say("Say it.", regex=pattern, max_tokens=40,
                                                     temperature=1.0, seed=seed)))

        async with trio.open_nursery() as nursery:
            for i, agent in enumerate(agents[:5]):
                nursery.start_soon(pick, agent, i)
            for i, agent in enumerate(agents[5:]):
                nursery.start_soon(match, agent, patterns[i], i)
    assert len(picked) == 5
    assert len(matched) == 5
    for reply in picked:
        assert reply.text in choices
        assert reply.data == reply.text
    for pattern, reply in matched:
        assert re.fullmatch(pattern, reply.text), (pattern, reply.text)
        assert reply.data == reply.text


async def test_a_free_rows_greedy_tokens_are_the_same_beside_constrained_rows() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        alone = await rt.spawn("alone", system="You are Alice.")
        expected = await alone.say("Good morning!", max_tokens=24)
        free = await rt.spawn("free", system="You are Alice.")
        others = [await rt.spawn(f"c{i}") for i in range(4)]
        got: list[troupe.Reply] = []

        async def free_turn() -> None:
            got.append(await free.say("Good morning!", max_tokens=24))

        async def constrained(i: int, agent: troupe.Agent) -> None:
            await agent.say("Go.", schema={"type": "array", "items": _i(), "minItems": 8,
                                           "maxItems": 8}, max_tokens=40)

        steps = rt.statistics().engine_steps
        async with trio.open_nursery() as nursery:
            for i, agent in enumerate(others):
                nursery.start_soon(constrained, i, agent)
            nursery.start_soon(free_turn)
        assert rt.statistics().peak_batch_size >= 5
        assert rt.statistics().engine_steps - steps < 24 + 40  # they overlapped
    assert got[0].tokens == expected.tokens
    assert got[0].text == expected.text


async def test_a_reply_cut_by_max_tokens_raises_incomplete_and_commits_nothing() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        agent = await rt.spawn("a")
        with pytest.raises(troupe.IncompleteReplyError) as caught:
            await agent.say("Vote.", schema=list[Vote], max_tokens=3)
        assert caught.value.finish_reason == "length"
        assert len(caught.value.tokens) == 3
        assert caught.value.text
        assert "[" in caught.value.text
        assert agent.transcript() == ()
        # A stop string that cuts the value is as incomplete.
        with pytest.raises(troupe.IncompleteReplyError):
            await agent.say("Vote.", schema=_obj({"a": _s(8, 8)}), stop='"', max_tokens=40)
        assert agent.transcript() == ()
        # And the agent goes on.
        reply = await agent.say("Where?", schema=Place, max_tokens=80)
        assert isinstance(reply.data, Place)
        assert [m.role for m in agent.transcript()] == ["user", "assistant"]


async def test_a_schema_that_cannot_be_compiled_is_a_value_error_before_the_turn() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        agent = await rt.spawn("a")
        bad: list[dict[str, Any]] = [
            {"schema": {"type": "strnig"}},
            {"schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
            {"regex": "(?<=a)b"},
            {"choices": []},
            {"choices": "north"},
            {"schema": Vote, "choices": ["a"]},
            {"schema": object},
            {"tools": [], "tool_choice": "auto"},
            {"tool_choice": "required"},
        ]
        for kwargs in bad:
            with pytest.raises((ValueError, TypeError)):
                await agent.say("Hello.", **kwargs)
        stats = rt.statistics()
        assert stats.turns_completed == 0
        assert stats.engine_steps == 0
        assert agent.transcript() == ()


async def test_stream_seed_and_temperature_with_a_schema() -> None:
    schema = _obj({"name": _s(5, 1), "n": _i()})
    async with troupe.open_runtime(model=TINY) as rt:
        agent = await rt.spawn("a")
        deltas = []
        async with agent.stream("Go.", schema=schema, max_tokens=60) as s:
            async for delta in s:
                deltas.append(delta)
        assert s.reply is not None
        assert "".join(deltas) == s.reply.text
        assert len(deltas) > 1
        jsonschema.validate(s.reply.data, schema)
        twins = [await rt.spawn(f"t{i}") for i in range(2)]
        sampled = [await t.say("Go.", schema=schema, temperature=1.5, seed=7, max_tokens=60)
                   for t in twins]
        assert sampled[0].text == sampled[1].text
        jsonschema.validate(sampled[0].data, schema)


async def test_cancelling_a_constrained_turn_frees_its_row_and_matcher() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        engine = rt._engine
        agent = await rt.spawn("a")
        async with agent.stream("Go.", schema=_s(400, 400), max_tokens=500) as s:
            async for _ in s:
                assert engine.counters.constrained_rows == 1
                (row,) = list(engine._sequences.values())
                mask = weakref.ref(row.mask)  # the row's processor, which holds the matcher
                del row
                break
        assert s.reply is None
        assert engine.counters.constrained_rows == 0
        gc.collect()
        assert mask() is None  # nothing in the batch holds it any more
        assert rt.statistics().turns_in_flight == 0
        assert rt.statistics().turns_cancelled == 1
        assert agent.transcript() == ()
        reply = await agent.say("Again.", choices=["x", "y"], max_tokens=4)
        assert reply.data in ("x", "y")
        assert rt.statistics().grammars_compiled == 2


# -- tools ------------------------------------------------------------------------------------

CALLED: list[str] = []


def lamp(on: bool) -> str:
    """Switch the lamp.

    Sync: runs on a worker thread."""
    CALLED.append("lamp")
    return "the lamp is " + ("on" if on else "off")


async def weather(city: Literal["paris", "rome"]) -> dict[str, str]:
    """Today's weather in a city."""
    CALLED.append("weather")
    await trio.lowlevel.checkpoint()
    return {"city": city, "sky": "clear"}


def broken(level: Literal[1, 2]) -> str:
    """A tool that fails."""
    CALLED.append("broken")
    raise RuntimeError(f"level {level} is out of order")


TOOLS = [lamp, weather, broken]


def test_tools_are_described_from_functions_and_records() -> None:
    tool = troupe.Tool.from_function(weather)
    assert tool.name == "weather"
    assert tool.description == "Today's weather in a city."
    assert tool.parameters_schema["properties"] == {"city": {"enum": ["paris", "rome"]}}
    assert tool.parameters_schema["required"] == ["city"]
    record = troupe.Tool("add", "Add.", {"type": "object", "properties": {}})
    assert record.describe()["function"]["name"] == "add"
    with pytest.raises(ValueError, match="name"):
        troupe.Tool("no spaces", "x", {})
    with pytest.raises(TypeError):
        troupe.Tool("x", "x", "not a schema")  # type: ignore[arg-type]


async def test_tool_choice_variants() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        agents = [await rt.spawn(f"a{i}") for i in range(4)]
        out: dict[str, troupe.Reply] = {}

        async def turn(agent: troupe.Agent, choice: str) -> None:
            out[choice] = await agent.say("Help.", tools=TOOLS, tool_choice=choice,
                                          max_tokens=120)

        async with trio.open_nursery() as nursery:
            for agent, choice in zip(agents, ["auto", "required", "none", "weather"],
                                     strict=True):
                nursery.start_soon(turn, agent, choice)
    assert "<tool_call>" not in out["none"].text
    assert out["none"].tool_calls == ()
    assert 1 <= len(out["required"].tool_calls) <= len(TOOLS)
    assert [c.name for c in out["weather"].tool_calls] == ["weather"]
    assert out["weather"].tool_calls[0].arguments["city"] in ("paris", "rome")
    ids = [c.id for r in out.values() for c in r.tool_calls]
    assert len(set(ids)) == len(ids)
    # "auto" leaves the model free; whatever calls it wrote in the template's format are
    # parsed (mlx-lm's JSON parser for this template).
    assert len(out["auto"].tool_calls) == out["auto"].text.count("</tool_call>")


async def test_a_tool_loop_runs_to_its_end_and_survives_a_reopen_and_a_fork(
    store: Path,
) -> None:
    CALLED.clear()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        agent = await rt.spawn("worker", system="You use tools.")
        replies = []
        for choice in ("lamp", "weather", "broken"):
            replies.append(await agent.run(f"Use {choice}.", tools=TOOLS, tool_choice=choice,
                                           max_steps=3, max_tokens=80))
        transcript = agent.transcript()
        twin = await agent.fork("twin")
        assert twin.transcript() == transcript
    assert sorted(set(CALLED)) == ["broken", "lamp", "weather"]
    tool_messages = [m.content for m in transcript if m.role == "tool"]
    assert any(t.startswith("the lamp is ") for t in tool_messages)
    assert any(json.loads(t).get("sky") == "clear" for t in tool_messages if t.startswith("{"))
    assert any(t == "error: RuntimeError: level 1 is out of order"
               or t == "error: RuntimeError: level 2 is out of order" for t in tool_messages)
    roles = [m.role for m in transcript]
    # Each run: the user's message, a call, its results, then turns until one calls none.
    assert roles[:3] == ["user", "assistant", "tool"]
    assert roles.count("user") == 3
    # Each run's last reply is in the transcript, and called no tool (the loop ended).
    assert all(troupe.Message("assistant", r.text) in transcript for r in replies)
    assert all(r.tool_calls == () for r in replies)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        back = await rt.get("worker")
        assert back.transcript() == transcript
        twin = await rt.get("twin")
        assert twin.transcript() == transcript
        reply = await twin.say("And now?", tools=TOOLS, tool_choice="none", max_tokens=8)
        # The fork's next turn reuses the stored KV of the whole transcript, tool messages
        # included (the same tools: they are part of the prompt).
        assert reply.cached_tokens > 100
        assert reply.prompt_tokens < 20


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "pipelined"])
def test_masks_follow_each_rows_tokens_in_eager_and_pipelined_steps(
    tiny_model: Path, eager: bool,
) -> None:
    # Straight on the adapter, on this thread: mlx-lm's pipelined steps (the GPU's
    # default) report each token a step late, and the mask still follows its own row.
    from troupe._records import Sampling
    from troupe._schema import make_constraint
    from troupe.actors._constraint import Grammars
    from troupe.actors._mlx import Batch, GrammarMask, LoadedModel, make_sampler

    model = LoadedModel(tiny_model)
    info = model.info
    grammars = Grammars(model.tokenizer, info.vocab_size, info.eos_token_ids)
    batch = Batch(model, max_batch_size=4, prefill_step_size=8, eager=eager)
    patterns = [r"[0-9]{4}-[a-z]{3}", r"(north|south) by [a-z]{2}"]
    masks = {}
    tokens: dict[int, list[int]] = {}
    for i, pattern in enumerate(patterns):
        constraint = make_constraint(regex=pattern)
        assert constraint is not None
        mask = GrammarMask(grammars.matcher(constraint), info.vocab_size,
                           min(info.eos_token_ids))
        uid = batch.insert(list(range(40, 50 + 7 * i)), [], None,
                           make_sampler(Sampling(), 0), 30, mask)
        masks[uid], tokens[uid] = (pattern, mask), []
    free = batch.insert(list(range(60, 70)), [], None, make_sampler(Sampling(), 0), 30)
    tokens[free] = []
    finished: set[int] = set()
    try:
        while len(finished) < len(tokens):
            _, outputs = batch.step()
            for out in outputs:
                tokens[out.uid].append(out.token)
                if out.finish_reason is not None:
                    finished.add(out.uid)
    finally:
        batch.close()
    for uid, (pattern, mask) in masks.items():
        generated = tokens[uid]
        assert generated[-1] in info.eos_token_ids  # the grammar ended the row
        assert mask.complete(generated)
        assert re.fullmatch(pattern, model.tokenizer.decode(generated[:-1]))
    # The free row's greedy tokens are those it makes alone.
    alone = Batch(model, max_batch_size=4, prefill_step_size=8, eager=eager)
    uid = alone.insert(list(range(60, 70)), [], None, make_sampler(Sampling(), 0), 30)
    solo: list[int] = []
    try:
        while not solo or (solo[-1] not in info.eos_token_ids and len(solo) < 30):
            _, outputs = alone.step()
            solo.extend(out.token for out in outputs if out.uid == uid)
    finally:
        alone.close()
    assert solo == tokens[free]


def test_troupe_tool_call_grammars_for_models_without_a_parser(tiny_model: Path) -> None:
    # The embedded template has mlx-lm's JSON parser, so "auto" runs free there; a model
    # without one gets text-or-calls in troupe's format. Checked on the grammar itself.
    from troupe._tools import as_tools, tool_constraint
    from troupe.actors._constraint import Grammars
    from troupe.actors._mlx import LoadedModel

    model = LoadedModel(tiny_model)
    grammars = Grammars(model.tokenizer, model.info.vocab_size, model.info.eos_token_ids)
    tools = as_tools(TOOLS)
    auto = tool_constraint(tools, "auto", native=False)
    none = tool_constraint(tools, "none", native=True)
    required = tool_constraint(tools, "required", native=True)
    assert tool_constraint(tools, "auto", native=True) is None
    assert auto is not None
    assert none is not None
    assert required is not None

    def accepts(constraint: Any, text: str) -> bool:
        matcher = grammars.matcher(constraint)
        tokens = grammars._tokenizer.tokenize_str(text)
        return bool(matcher.consume_tokens(tokens) and matcher.is_accepting())

    call = '<tool_call>\n{"name":"lamp","arguments":{"on":true}}\n</tool_call>'
    two = call + '\n<tool_call>\n{"name":"weather","arguments":{"city":"rome"}}\n</tool_call>'
    assert accepts(auto, "Just text.")
    assert accepts(auto, call)
    assert accepts(auto, two)
    assert not accepts(auto, "Text, then <tool_call>")
    assert not accepts(auto, call.replace("lamp", "oven"))
    assert accepts(none, "Just text.")
    assert not accepts(none, call)
    assert accepts(required, call)
    assert not accepts(required, "Just text.")
    assert not accepts(required, "\n".join([call] * 4))  # at most one call per tool


async def test_run_checks_its_arguments_at_the_door() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        agent = await rt.spawn("a")
        record = troupe.Tool("lookup", "Look up.", {"type": "object", "properties": {}})
        with pytest.raises(ValueError, match="no function"):
            await agent.run("Go.", tools=[record])
        with pytest.raises(ValueError, match="max_steps"):
            await agent.run("Go.", tools=TOOLS, max_steps=0)
        with pytest.raises(ValueError, match="tool_choice"):
            await agent.run("Go.", tools=TOOLS, tool_choice="oven")
        assert agent.transcript() == ()
        assert rt.statistics().engine_steps == 0


def test_tool_calls_are_parsed_with_the_models_parser_or_troupes() -> None:
    from troupe._tools import as_tools, parse_tool_calls

    tools = as_tools(TOOLS)
    text = ('Let me see. <tool_call>\n{"name": "weather", "arguments": {"city": "rome"}}\n'
            '</tool_call> and <tool_call>{"name": "oven", "arguments": {}}</tool_call>'
            '<tool_call>{broken</tool_call><tool_call>{"name": "lamp", "arguments": '
            '"{\\"on\\": true}"}</tool_call>')
    calls = parse_tool_calls(text, tools, None)
    assert [(c.name, c.arguments) for c in calls] == [("weather", {"city": "rome"}),
                                                      ("lamp", {"on": True})]

    def mistral(body: str, described: Any) -> Any:  # mlx-lm's parsers take (text, tools)
        assert [d["function"]["name"] for d in described] == ["lamp", "weather", "broken"]
        return json.loads(body)

    text = '[TOOL_CALLS][{"name": "lamp", "arguments": {"on": false}}]'
    calls = parse_tool_calls(text, tools, (mistral, "[TOOL_CALLS]", ""))
    assert [(c.name, c.arguments) for c in calls] == [("lamp", {"on": False})]


async def test_async_tools_run_concurrently_and_sync_ones_on_worker_threads() -> None:
    import threading

    from troupe._records import ToolCall
    from troupe._tools import as_tools, call_tools

    pinged, ponged = trio.Event(), trio.Event()
    threads: list[str] = []

    async def ping() -> str:
        """Waits for pong: only concurrent calls finish."""
        pinged.set()
        await ponged.wait()
        return "ping"

    async def pong() -> str:
        """Waits for ping."""
        ponged.set()
        await pinged.wait()
        return "pong"

    def where() -> list[str]:
        """Says where it ran."""
        threads.append(threading.current_thread().name)
        return threads

    tools = as_tools([ping, pong, where])
    calls = tuple(ToolCall(f"c{i}", name, {}) for i, name in enumerate(["ping", "pong", "where"]))
    with trio.fail_after(10):
        results = await call_tools(tools, calls)
    assert [m.content for m in results] == ["ping", "pong", json.dumps(threads)]
    assert all(m.role == "tool" for m in results)
    assert threads != [threading.current_thread().name]
