"""Load an optimized BLAS before MLX, on Linux.

The mlx[cpu] wheel for Linux bundles netlib's reference BLAS (3-6 GFLOP/s on a 1-2K
matmul); loading OpenBLAS with RTLD_GLOBAL before the first ``import mlx`` makes MLX bind to
it instead (89-98 GFLOP/s on the project's machines, see DESIGN.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

import attrs

INSTALL_HINT = (
    "install OpenBLAS for 4-12x faster prefill: `apt-get install libopenblas0-pthread` "
    "(Debian/Ubuntu) or `dnf install openblas` (Fedora); or point TROUPE_BLAS at a libopenblas.so"
)

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
    """Which BLAS MLX uses in this process."""

    name: str
    path: str | None


_status: BlasStatus | None = None


def _find() -> str | None:
    explicit = os.environ.get("TROUPE_BLAS")
    if explicit:
        return explicit
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def load_blas() -> BlasStatus:
    """Load OpenBLAS globally if this is Linux and MLX is not imported yet. Idempotent."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus("platform default", None)
        return _status
    path = _find()
    if path is not None and "mlx.core" not in sys.modules:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            path = None
    elif "mlx.core" in sys.modules:
        # Too late to interpose; it still counts if the host loaded OpenBLAS itself.
        path = _mapped_openblas()
    if path is None:
        _status = BlasStatus("reference (bundled with mlx)", None)
        warnings.warn(f"troupe: MLX is using its slow reference BLAS; {INSTALL_HINT}",
                      BlasWarning, stacklevel=2)
    else:
        _status = BlasStatus("OpenBLAS", path)
    return _status


def _mapped_openblas() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        if "libopenblas" in line:
            return line.split()[-1]
    return None
