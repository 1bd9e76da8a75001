"""The mlx-lm version check: troupe's subclasses of mlx-lm use its private names, so a
model loads only under the mlx-lm versions they were written against."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from troupe._errors import ModelLoadError
from troupe.actors._mlx._version import (
    MLX_LM_SUPPORTED,
    check_mlx_lm_version,
    installed_mlx_lm_version,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", ["0.32.2", "0.32.3", "0.32.10", "0.32.2.post1", "0.32.4rc1",
                                     "0.32.2+local"])
def test_versions_in_the_range_pass(version: str) -> None:
    check_mlx_lm_version(version)


@pytest.mark.parametrize("version", ["0.32.1", "0.31.9", "0.33", "0.33.0", "0.33.0rc1",
                                     "0.40.0", "1.0", "", "unknown"])
def test_versions_outside_the_range_name_both(version: str) -> None:
    with pytest.raises(ModelLoadError) as raised:
        check_mlx_lm_version(version)
    message = str(raised.value)
    assert f"mlx-lm {version} is installed" in message
    assert "mlx-lm>=0.32.2,<0.33" in message


def test_the_installed_mlx_lm_passes() -> None:
    version = installed_mlx_lm_version()
    assert version == metadata.version("mlx-lm")
    check_mlx_lm_version(version)


def test_the_range_is_the_one_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("mlx-lm")]
    low, high = MLX_LM_SUPPORTED
    assert pins == [f"mlx-lm>={low},<{high}"]
