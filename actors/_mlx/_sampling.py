"""Per-turn samplers over a batch step's log-probabilities."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..._records import GREEDY_BELOW, Sampling

Sampler = Callable[[mx.array], mx.array]


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(sampling: Sampling, seed: int) -> Sampler:
    """A per-turn sampler. Greedy turns share one function, so the batch samples them at once."""
    if sampling.temperature < GREEDY_BELOW:
        return _greedy
    from mlx_lm.sample_utils import apply_top_p

    key = mx.random.key(seed)
    inverse_temperature = 1.0 / sampling.temperature
    top_p = sampling.top_p

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        # A key of its own per turn: the turn's draws do not depend on its batch mates.
        key, subkey = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * inverse_temperature, key=subkey)

    return sample


class GrammarMask:
    """A constrained turn's logits processor: its row's logits, but the tokens its grammar
    allows next, on that row only (mlx-lm calls it with the row's own slice).

    mlx-lm calls it once per step with the tokens the row has (the last one is the token
    this step feeds): from the second call on, that token is the one sampled last step,
    which the matcher must consume before computing the next mask. With eager steps the
    engine has handed it over already (``catch_up``: no array is read here); with
    pipelined ones (a step reports the token it feeds) it is read from the row's tokens.
    Engine thread only.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos: int) -> None:
        self.matcher = matcher
        """The turn's llguidance ``LLMatcher`` (its own: matchers hold a parse state)."""
        self._words = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)
        self._eos = eos
        self._calls = 0
        self.consumed = 0
        """How many of the turn's generated tokens the matcher has consumed."""
        self.seconds = 0.0
        """Time spent consuming tokens and computing masks."""

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        start = time.perf_counter()
        if self.consumed < self._calls:
            self.matcher.consume_token(int(context[-1].tolist()))  # type: ignore[arg-type]
            self.consumed += 1
        self._calls += 1
        width = logits.shape[-1]
        if self.matcher.is_error():
            allowed = np.zeros(width, dtype=bool)  # a broken matcher ends the turn
            allowed[self._eos] = True
        else:
            words = self._words
            self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(bool)
            allowed = bits[:width]
            if allowed.size < width:
                allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=bool)])
        masked = mx.where(mx.array(allowed), logits, mx.array(-math.inf, dtype=logits.dtype))
        self.seconds += time.perf_counter() - start
        return masked

    def catch_up(self, generated: Sequence[int]) -> None:
        """Consume the turn's tokens the matcher has not seen yet (``generated``: all of
        them so far), so the next call reads none back from the batch."""
        if self.consumed < len(generated):
            start = time.perf_counter()
            for token in generated[self.consumed :]:
                self.matcher.consume_token(token)
            self.consumed = len(generated)
            self.seconds += time.perf_counter() - start

    def complete(self, generated: Sequence[int]) -> bool:
        """Whether ``generated`` (all the turn's tokens) is a whole value of the grammar:
        the tokens the matcher has not consumed yet are consumed now."""
        self.catch_up(generated)
        return not self.matcher.is_error() and bool(
            self.matcher.is_accepting() or self.matcher.is_stopped())
