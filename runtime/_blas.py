"""Load an optimized BLAS before MLX, on Linux.

The mlx[cpu] wheel for Linux bundles netlib's reference BLAS, many times slower than an
optimized one; loading OpenBLAS or MKL with RTLD_GLOBAL before the first ``import mlx``
makes MLX bind to it instead (docs/benchmarks.md has the demo with each).

Search order: ``$TROUPE_BLAS`` (a library path, or ``openblas`` / ``mkl`` for one of the two
searches below), then the system's OpenBLAS, then ``libmkl_rt`` from the ``mkl`` wheel (the
``[fast]`` extra, for machines without root). MKL ran the demo ~15% faster than OpenBLAS on
an Intel host (a matmul on an AMD one: equal), but it brings its own OpenMP runtime
(libiomp5) into the host process, so the OpenBLAS the machine's owner installed goes first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from pathlib import Path

import attrs

# The mkl wheel exists for x86-64 only; elsewhere the hint names OpenBLAS alone.
_PIP_HINT = "`pip install mkl` (what troupe's [fast] extra installs) or " if (
    platform.machine().lower() in ("x86_64", "amd64")) else ""
INSTALL_HINT = (
    f"for 4-12x faster prefill: {_PIP_HINT}`apt-get install libopenblas0-pthread` "
    "(`dnf install openblas` on Fedora), or point TROUPE_BLAS at a libopenblas.so or libmkl_rt.so"
)

REFERENCE = "reference (bundled with mlx)"

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


class BlasWarning(RuntimeWarning):
    """MLX will run on its bundled reference BLAS, which is slow."""


@attrs.frozen
class BlasStatus:
    """Which BLAS MLX uses in this process: ``name`` (OpenBLAS, MKL, ...) and its ``path``."""

    name: str
    path: str | None


_status: BlasStatus | None = None
_why_slow = ""


def _system_openblas() -> str | None:
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def _wheel_mkl() -> str | None:
    """``libmkl_rt`` as the ``mkl`` wheel installed it (into ``<prefix>/lib``, not the package)."""
    from importlib import metadata

    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return None
    found = sorted(Path(str(f.locate())).resolve() for f in files
                   if f.name.startswith("libmkl_rt.so"))
    return next((str(p) for p in found if p.exists()), None)


def _name(path: str) -> str:
    file = Path(path).name.lower()
    if "mkl" in file:
        return "MKL"
    if "openblas" in file:
        return "OpenBLAS"
    return Path(path).name


def _candidates() -> list[str]:
    explicit = os.environ.get("TROUPE_BLAS", "")
    if explicit.lower() == "openblas":
        return [p for p in (_system_openblas(),) if p]
    if explicit.lower() == "mkl":
        return [p for p in (_wheel_mkl(),) if p]
    if explicit:
        # An explicit path is the only one tried: TROUPE_BLAS=/nonexistent means "reference".
        return [explicit]
    return [p for p in (_system_openblas(), _wheel_mkl()) if p]


def _started_as_the_cli() -> bool:
    # The troupe command prints the slow-BLAS note as a line of its own. It cannot filter
    # this warning itself: importing troupe._cli runs this package's __init__ first.
    if sys.argv and sys.argv[0] == "-m":  # python -m troupe._cli, while it is being found
        return "troupe._cli" in sys.orig_argv or "-mtroupe._cli" in sys.orig_argv
    return bool(sys.argv) and Path(sys.argv[0]).name == "troupe"  # the console script


def slow_blas_note() -> str:
    """One line on why MLX runs on the reference BLAS and how to get a fast one."""
    return f"MLX is using its slow reference BLAS{_why_slow}; {INSTALL_HINT}"


def load_blas() -> BlasStatus:
    """Load an optimized BLAS globally if this is Linux and MLX is not imported yet.

    Idempotent. Warns once (``BlasWarning``) when MLX is left on its reference BLAS.
    """
    global _status, _why_slow
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus("platform default", None)
        return _status
    path: str | None = None
    if "mlx.core" in sys.modules:
        # Too late to interpose; it still counts if the host loaded one itself.
        path = _mapped_blas()
    else:
        tried = _candidates()
        for candidate in tried:
            try:
                ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            path = candidate
            break
        explicit = os.environ.get("TROUPE_BLAS", "")
        if path is None and explicit:
            _why_slow = (f" (TROUPE_BLAS={explicit} could not be loaded)" if tried
                         else f" (TROUPE_BLAS={explicit}: none installed)")
    if path is None:
        _status = BlasStatus(REFERENCE, None)
        if not _started_as_the_cli():
            warnings.warn(f"troupe: {slow_blas_note()}", BlasWarning, stacklevel=2)
    else:
        _status = BlasStatus(_name(path), path)
    return _status


def _mapped_blas() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        if "libopenblas" in line or "libmkl_rt" in line:
            return line.split()[-1]
    return None
