"""Per-turn samplers over a batch step's log-probabilities."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

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
