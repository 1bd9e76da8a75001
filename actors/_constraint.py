"""Compiled grammars, per runtime: a constrained turn's matcher.

A grammar compiled against the model's tokenizer (its lexer, the token trie it walks) is
kept as a pristine ``LLMatcher``; each turn gets a copy of it, with a parse state of its
own. So one schema used by many agents, turn after turn, is compiled once.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import attrs

from .._schema import Constraint
from ._mlx import Tokenizer

KEPT = 256
"""Compiled grammars kept (least recently used goes first)."""


@attrs.define
class GrammarCounters:
    compiled: int = 0
    """Grammars compiled against the tokenizer (the cache missed)."""
    reused: int = 0
    """Matchers copied from a compiled grammar (the cache hit)."""
    compile_seconds: float = 0.0


class Grammars:
    """The runtime's compiled grammars. Thread-safe: turns compile on worker threads."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
    ) -> None:
        self._source = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._tokenizer: Any = None
        self._kept: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._compiling = threading.Lock()
        self.counters = GrammarCounters()

    @property
    def eos(self) -> int:
        """The end token a broken matcher falls back to."""
        return min(self._eos)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh llguidance ``LLMatcher`` for ``constraint`` (compiled on first use).

        ValueError if the grammar does not compile against the model's tokenizer.
        """
        import llguidance

        copied = self._copy(constraint.key)
        if copied is not None:
            return copied
        # One compile at a time: turns that start together with one new schema wait for
        # its first compile and copy it, rather than compile it each.
        with self._compiling:
            copied = self._copy(constraint.key)
            if copied is not None:
                return copied
            if self._tokenizer is None:
                # Once per runtime (about a second for a large vocabulary).
                self._tokenizer = self._source.grammar_tokenizer(self._vocab_size, self._eos)
            start = time.perf_counter()
            template = llguidance.LLMatcher(self._tokenizer, constraint.grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"the grammar cannot be compiled: {template.get_error()}")
            with self._lock:
                self.counters.compiled += 1
                self.counters.compile_seconds += time.perf_counter() - start
                self._kept[constraint.key] = template
                while len(self._kept) > KEPT:
                    self._kept.popitem(last=False)
            return template.deep_copy()

    def _copy(self, key: str) -> Any:
        with self._lock:
            template = self._kept.get(key)
            if template is None:
                return None
            self._kept.move_to_end(key)
            self.counters.reused += 1
            # Under the lock: worker threads copy the same template.
            return template.deep_copy()
