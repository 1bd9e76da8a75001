"""Messages, replies and statistics: frozen attrs records."""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from ._validate import check_str

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled"]


@attrs.frozen
class Message:
    """One entry of an agent's transcript.

    ``role`` is ``"user"``, ``"assistant"`` or ``"tool"`` (a tool's result, which
    ``Agent.run`` appends after the assistant message that called it; an assistant
    message that calls tools holds the calls as the model wrote them).
    """

    role: Role
    content: str


@attrs.frozen
class ToolCall:
    """One tool call of a reply: the tool's ``name``, its ``arguments`` (parsed JSON, as
    the tool's parameters schema describes) and an ``id`` unique within the agent."""

    id: str
    name: str
    arguments: dict[str, Any] = attrs.field(hash=False)


def _check_max_tokens(_: object, __: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_tokens must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"max_tokens must be >= 1, got {value}")


def _check_temperature(_: object, __: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"temperature must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {value}")


def _check_top_p(_: object, __: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"top_p must be a number, got {type(value).__name__}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {value}")


def _check_seed(_: object, __: attrs.Attribute[int | None], value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int or None, got {type(value).__name__}")
    if not (0 <= value < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {value}")


# The engine scans every stop string after every token of the turn, on the thread all
# agents share: bound the work one turn can ask for.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# Below this, 1/temperature overflows float32 (~3e-39 gave uniform noise): such turns are
# greedy, which is what a temperature this close to 0 means anyway.
GREEDY_BELOW = 1e-6


def _to_stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise TypeError(f"stop must be a string or a sequence of strings, got {value!r}")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    for item in value:
        check_str(item, "a stop string")
        if not item:
            raise ValueError("stop strings must not be empty")
        if len(item) > MAX_STOP_LENGTH:
            raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters, "
                             f"got one of {len(item)}")
    return tuple(value)


@attrs.frozen
class Sampling:
    """How one turn samples: validated on construction (ValueError/TypeError).

    ``temperature`` 0 is greedy, and so is any temperature below ``GREEDY_BELOW`` (1e-6).
    ``stop``: at most 16 strings of at most 256 characters.
    """

    max_tokens: int = attrs.field(default=256, validator=_check_max_tokens)
    temperature: float = attrs.field(default=0.0, validator=_check_temperature)
    top_p: float = attrs.field(default=1.0, validator=_check_top_p)
    seed: int | None = attrs.field(default=None, validator=_check_seed)
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_stops)


@attrs.frozen
class Reply:
    """What one turn produced.

    ``tokens`` are the generated token ids (the stop string, if one ended the turn, is cut
    from ``text``). ``prompt_tokens`` were prefilled this turn; ``cached_tokens`` were reused
    from the agent's KV cache.
    """

    agent_id: str
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: FinishReason
    # Not hashed (a value may be a dict or a list): replies stay hashable.
    data: Any = attrs.field(default=None, hash=False)
    """A constrained turn's value: for ``schema=``, the parsed JSON, structured into the
    schema when it is a type; for ``choices=`` and ``regex=``, the text. None otherwise."""
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), hash=False)
    """The tools the reply calls (a turn given ``tools=``), in order."""


@attrs.frozen
class AgentStatistics:
    """A snapshot of one agent."""

    agent_id: str
    turns: int
    messages: int
    cached_tokens: int
    tokens_generated: int
    tokens_prefilled: int
    tokens_reused: int


@attrs.frozen
class RuntimeStatistics:
    """A snapshot of the whole runtime."""

    agents: int
    """Every agent, active or only in the store."""
    agents_active: int
    """Agents with an actor in memory (the others cost nothing until addressed)."""
    activations: int
    """Times a stored agent was brought back into memory (addressed after its retirement
    for being idle, or after a reopen)."""
    deactivations: int
    """Times an agent idle for ``idle_timeout`` left memory."""
    turns_in_flight: int
    turns_completed: int
    turns_failed: int
    turns_cancelled: int
    tokens_generated: int
    tokens_prefilled: int
    tokens_reused: int
    peak_batch_size: int
    engine_steps: int
    decode_seconds: float
    prefill_seconds: float
    caches_saved: int
    """Turns whose new KV blocks were all written to the store."""
    caches_loaded: int
    """Turns that restored KV blocks from the store's disk."""
    caches_unsaved: int
    """Turns kept although their KV blocks could not all be written (a reopen re-prefills)."""
    kv_budget: int
    """Bytes of KV that idle agents and shared blocks may hold in memory."""
    kv_hot_bytes: int
    blocks_in_memory: int
    blocks_on_disk: int
    blocks_shared: int
    """Blocks held by more than one agent's chain."""
    evictions: int
    restores: int
    """Blocks loaded from disk."""
    prefetches: int
    """Times an agent's KV was loaded ahead of its turns, when the agent was activated."""
    rebuilds: int
    """Turns that prefilled again KV an agent had held (evicted with no copy, or damaged)."""
    store_bytes_written: int
    store_bytes_read: int
    mask_seconds: float
    """Time constrained turns spent on their token masks, on the engine thread (counted as
    each turn leaves the batch)."""
    grammars_compiled: int
    """Grammars compiled against the model's tokenizer (a schema, choices or regex new to
    this runtime)."""
    grammars_reused: int
    """Constrained turns whose grammar was already compiled (copied, not compiled)."""


@attrs.define
class TurnCounters:
    """The runtime's running totals (mutable; ``statistics()`` snapshots them)."""

    turns_completed: int = 0
    turns_failed: int = 0
    turns_cancelled: int = 0
    tokens_generated: int = 0
    tokens_prefilled: int = 0
    tokens_reused: int = 0
