"""Checks at the door: what troupe accepts must be usable later.

Every public entry point runs its arguments through these before anything is queued or
stored, so a bad value raises ValueError/TypeError in the caller and changes nothing.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 200

# Unicode letters and digits (\w, which includes "_") and a few separators; no spaces,
# no control or line-break characters (U+0085, U+2028), nothing a log line would mangle.
_ID = re.compile(r"[\w.:@/+=-]+")
ID_ALPHABET = "letters, digits and _ . : @ / + = -"


def check_str(value: object, what: str) -> str:
    """``value`` as a str that encodes to UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode text: {value[exc.start:exc.end]!r} at position "
            f"{exc.start} is a lone surrogate"
        ) from None
    return value


def check_message(value: object) -> str:
    """A user message: non-blank, valid Unicode text."""
    text = check_str(value, "message")
    if not text.strip():
        raise ValueError("message must not be empty")
    return text


def check_id(value: object) -> str:
    """An agent id: 1-200 characters from ``ID_ALPHABET``."""
    agent_id = check_str(value, "agent id")
    if not (0 < len(agent_id) <= MAX_ID_LENGTH) or _ID.fullmatch(agent_id) is None:
        raise ValueError(
            f"agent id must be 1-{MAX_ID_LENGTH} characters, each one of {ID_ALPHABET}; "
            f"got {agent_id!r}"
        )
    return agent_id
