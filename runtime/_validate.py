"""Checks at the door: what troupe accepts must be usable later.

Every public entry point runs its arguments through these before anything is queued or
stored, so a bad value raises ValueError/TypeError in the caller and changes nothing.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction

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


def _shown(value: object) -> str:
    """``value`` for an error message, kept short (an int too long to print is sized)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def check_int(value: object, what: str, low: int, high: int) -> int:
    """An int (not a bool, not a float) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be from {low} to {high}, got {_shown(value)}")
    return int(value)


def check_seconds(value: object, what: str) -> float | None:
    """A duration: a finite number of seconds > 0, or None (never)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds or None, "
                        f"got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0 or None, "
                         f"got {_shown(value)}")
    return seconds


def check_path(value: object, what: str) -> str:
    """A path given as a str or an os.PathLike: not empty (which pathlib would take for
    the current directory), no NUL character."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{what} must be a str or an os.PathLike, got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a text path, got {type(path).__name__}")
    if not path.strip():
        raise ValueError(f"{what} must not be empty, got {path!r}")
    if "\0" in path:
        raise ValueError(f"{what} must not contain a NUL character, got {_shown(path)}")
    return path


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BYTES = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-z]*)\s*")
MAX_BYTES = 2**62
# More digits than this are out of range (whole) or below a byte (decimals): refused
# before they are turned into numbers at all.
_MAX_DIGITS = 30


def parse_bytes(value: object, what: str) -> int:
    """A byte count from 0 to 2**62: an int, or a string such as "512MB", "1.5GiB" or
    "64 MiB" (read exactly: no float rounds or overflows)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be an int or a string like '512MB', "
                        f"got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_BYTES:
            raise _out_of_range(value, what)
        return int(value)
    match = _BYTES.fullmatch(value)
    unit = match.group(3).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{what} must look like '512MB' or '1GiB', got {_shown(value)}")
    whole, decimals = match.group(1).lstrip("0") or "0", match.group(2) or "0"
    if len(whole) > _MAX_DIGITS:
        raise _out_of_range(value, what)
    if len(decimals) > _MAX_DIGITS:
        raise ValueError(f"{what} has more decimals than bytes can tell apart: {_shown(value)}")
    count = math.floor(Fraction(f"{whole}.{decimals}") * _UNITS[unit])
    if count > MAX_BYTES:
        raise _out_of_range(value, what)
    return count


def _out_of_range(value: object, what: str) -> ValueError:
    return ValueError(f"{what} must be from 0 to 2**62 bytes, got {_shown(value)}")
