"""Loading a model with mlx-lm, and what troupe knows about it: ``ModelInfo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from ..._errors import ModelLoadError
from ._blocks import BlockLayout
from ._tokenizer import Tokenizer
from ._version import check_mlx_lm_version, installed_mlx_lm_version


@attrs.frozen
class ModelInfo:
    """What the runtime knows about its model."""

    path: str
    name: str
    context_length: int
    num_layers: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    kv_bytes_per_token: int
    """Measured: the nbytes of one token's keys and values over all layers."""
    persistable_cache: bool
    """Whether the model's cache is plain KVCache layers, the kind troupe cuts into blocks."""


def _context_length(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return _context_length(text_config)
    return 4096


class LoadedModel:
    """A model and its tokenizer, loaded on the engine thread.

    ModelLoadError if ``path`` is not a model mlx-lm loads, or if the installed mlx-lm is
    not a version troupe supports (``_version.MLX_LM_SUPPORTED``): troupe's batch classes
    use mlx-lm's private names, so another version is refused here, before any batch runs.
    """

    def __init__(self, path: Path) -> None:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        check_mlx_lm_version(installed_mlx_lm_version())
        try:
            from mlx_lm import load
            from mlx_lm.models.cache import KVCache, make_prompt_cache

            self.model, wrapped = load(str(path))
            config = json.loads(config_file.read_text())
            probe = make_prompt_cache(self.model)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the model at {path}: {exc}") from exc
        self.tokenizer = Tokenizer(wrapped)
        layers = len(probe)
        blocks = all(type(c) is KVCache for c in probe)
        self.layout: BlockLayout | None = None
        # One real token through the model, evaluated: the cache's true shapes, dtype and
        # bytes; and MLX's first compiled kernel runs now, while the model loads. On CPU
        # that first run checks for a C++ compiler with system(), which ignores Ctrl-C in
        # the whole process while it runs: better here than in the middle of a turn.
        try:
            logits = self.model(mx.array([[0]]), cache=probe)
            mx.eval(logits)
            width = int(logits.shape[-1])
            if blocks:
                self.layout = BlockLayout.of(probe)
        except Exception as exc:
            raise ModelLoadError(f"the model at {path} failed a one-token probe: {exc}") \
                from exc
        self.info = ModelInfo(
            path=str(path),
            name=path.name,
            context_length=_context_length(config),
            num_layers=layers,
            # The logits' width: what a constrained turn's token mask covers.
            vocab_size=width,
            eos_token_ids=frozenset(int(t) for t in wrapped.eos_token_ids),
            kv_bytes_per_token=self.layout.bytes_per_token if self.layout else 0,
            persistable_cache=blocks,
        )
