"""The mlx-lm versions troupe's subclasses of mlx-lm were written against.

``_batch_cache.py`` and ``_generator.py`` subclass mlx-lm's batch classes and use their
private names, which any mlx-lm release may change. ``LoadedModel`` calls
``check_mlx_lm_version`` before it loads a model, so another mlx-lm fails there, with a
ModelLoadError naming both versions, not with an AttributeError in a batch step.
"""

from __future__ import annotations

import re
from importlib import metadata

from ..._errors import ModelLoadError

MLX_LM_SUPPORTED = ("0.32.2", "0.33")
"""mlx-lm ``>=`` the first, ``<`` the second: the versions whose private names
``_batch_cache.py`` and ``_generator.py`` were read from (pyproject.toml pins the same)."""

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def _release(version: str) -> tuple[int, ...]:
    """The release numbers a version string starts with; () if none (below every range)."""
    match = _RELEASE.match(version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def check_mlx_lm_version(version: str) -> None:
    """ModelLoadError unless mlx-lm ``version`` (as its package metadata spells it) is in
    ``MLX_LM_SUPPORTED``. Only the release numbers count (``0.32.3rc1`` is 0.32.3)."""
    low, high = MLX_LM_SUPPORTED
    wanted = f"mlx-lm>={low},<{high}"
    if not _release(low) <= _release(version) < _release(high):
        raise ModelLoadError(
            f"mlx-lm {version} is installed, but troupe supports only {wanted}: it "
            f"subclasses mlx-lm's batch classes as those versions define them "
            f"(pip install '{wanted}')"
        )


def installed_mlx_lm_version() -> str:
    """The installed mlx-lm's version; ModelLoadError if none is installed."""
    try:
        return metadata.version("mlx-lm")
    except metadata.PackageNotFoundError as exc:
        low, high = MLX_LM_SUPPORTED
        raise ModelLoadError(f"mlx-lm is not installed (troupe needs mlx-lm>={low},<{high})") \
            from exc
