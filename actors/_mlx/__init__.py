"""The typed adapter around mlx-lm: the one package that knows its internals.

mlx-lm is untyped and moves fast; troupe uses its loader, chat templates, KV cache classes
and ``BatchGenerator``, all through this package. Everything that makes or evaluates MLX
arrays here must run on the engine thread (MLX streams are thread-local).

- ``_model``: loading a model (``LoadedModel``) and ``ModelInfo``.
- ``_tokenizer``: the tokenizer (``Tokenizer``) and incremental detokenization
  (``TextStream``).
- ``_sampling``: per-turn samplers (``make_sampler``); constrained rows' token masks
  (``GrammarMask``).
- ``_blocks``: KV caches as blocks: ``BlockLayout``, ``cut_blocks``, ``row_cache``...
- ``_batch``: continuous batching behind a typed surface (``Batch``).
- ``_batch_cache``, ``_generator``: troupe's subclasses of mlx-lm's KV cache and batch
  generator classes, the only code that uses mlx-lm's private names; imported on first
  use, since importing mlx-lm takes seconds.
- ``_version``: the mlx-lm versions those subclasses were written against, checked when a
  model is loaded (ModelLoadError outside them).
"""

from ._batch import Batch, StepOutput, eager_default, release_thread_resources
from ._blocks import (
    BlockLayout,
    KVBlock,
    KVLayers,
    block_bytes,
    block_nbytes,
    cache_tokens,
    cut_blocks,
    row_cache,
)
from ._model import LoadedModel, ModelInfo
from ._sampling import GrammarMask, Sampler, make_sampler
from ._tokenizer import NO_LENGTH_LIMIT, TextStream, Tokenizer

__all__ = [
    "NO_LENGTH_LIMIT",
    "Batch",
    "BlockLayout",
    "GrammarMask",
    "KVBlock",
    "KVLayers",
    "LoadedModel",
    "ModelInfo",
    "Sampler",
    "StepOutput",
    "TextStream",
    "Tokenizer",
    "block_bytes",
    "block_nbytes",
    "cache_tokens",
    "cut_blocks",
    "eager_default",
    "make_sampler",
    "release_thread_resources",
    "row_cache",
]
