"""Chat-template rendering off the event loop, with a lane for long texts.

A tokenizer instance takes one caller at a time, and tokenizing a long message takes a
while (about 1 s per MB here): if every agent queued on one tokenizer, one huge message
would stall every other agent's turn. Ordinary renders share the first lane; a render that
carries a long new text goes to a second lane with a tokenizer of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread

from .._errors import ContextLengthError
from ._mlx import Tokenizer

# New text longer than this (in characters) is tokenized in the long lane.
LONG_TEXT = 8192


class Renderer:
    """Renders conversations to token ids for the agents; made once per runtime."""

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        self._short = tokenizer
        self._long: Tokenizer | None = None
        self._short_lane = anyio.CapacityLimiter(1)
        self._long_lane = anyio.CapacityLimiter(1)
        self.context_length = context_length

    def at_least(self, chars: int) -> int:
        """A lower bound on the tokens of ``chars`` characters of text.

        No token spells more than ``max_token_chars`` characters; the factor 2 leaves room
        for normalizers that drop characters (accents, for one).
        """
        return chars // (2 * self._short.max_token_chars)

    def check_length(self, agent_id: str, chars: int, max_tokens: int) -> None:
        """ContextLengthError, without tokenizing, for text that cannot possibly fit."""
        needed = self.at_least(chars) + max_tokens
        if needed > self.context_length:
            raise ContextLengthError(
                f"agent {agent_id!r}: a message of {chars} characters is at least "
                f"{needed - max_tokens} tokens; with max_tokens {max_tokens} that exceeds the "
                f"model's context of {self.context_length}",
                needed=needed, limit=self.context_length,
            )

    @property
    def tool_parser(self) -> tuple[Any, str, str] | None:
        """mlx-lm's tool-call parser for the model (parse, start, end), or None."""
        parser: tuple[Any, str, str] | None = self._short.tool_parser
        return parser

    async def render(
        self, messages: Sequence[dict[str, str]], new_chars: int,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` (with ``tools`` for the template); ``new_chars`` is the
        length of the text new this time."""
        if new_chars <= LONG_TEXT:
            return await anyio.to_thread.run_sync(
                self._short.render, messages, tools, limiter=self._short_lane
            )
        return await anyio.to_thread.run_sync(
            self._render_long, messages, tools, limiter=self._long_lane
        )

    def _render_long(
        self, messages: Sequence[dict[str, str]], tools: Sequence[dict[str, Any]] | None,
    ) -> list[int]:
        if self._long is None:
            self._long = self._short.copy()
        return self._long.render(messages, tools)

    async def check_fits(
        self, agent_id: str, messages: Sequence[dict[str, str]], new_chars: int
    ) -> None:
        """ContextLengthError unless ``messages`` leave room for at least one reply token."""
        self.check_length(agent_id, new_chars, 1)
        needed = len(await self.render(messages, new_chars)) + 1
        if needed > self.context_length:
            raise ContextLengthError(
                f"agent {agent_id!r}: {needed - 1} tokens leave no room for a reply in the "
                f"model's context of {self.context_length}",
                needed=needed, limit=self.context_length,
            )
