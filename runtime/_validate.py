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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: object, what: str) -> int:
    """A byte count: an int, or a string such as "512MB", "1.5GiB" or "64 MiB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be an int or a string like '512MB', got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(f"{what} must look like '512MB' or '1GiB', got {value!r}")
        count = int(float(match.group(1)) * _UNITS[unit])
    if count < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return count
