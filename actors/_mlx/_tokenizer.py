"""mlx-lm's tokenizer behind a typed surface, and incremental detokenization."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from typing import Any

# transformers' VERY_LARGE_INTEGER: a tokenizer's model_max_length when there is none.
NO_LENGTH_LIMIT = int(1e30)


class Tokenizer:
    """mlx-lm's tokenizer behind a typed surface. Not for concurrent use: one caller at a
    time per instance (``copy`` makes another)."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped
        if hasattr(wrapped, "model_max_length"):
            # troupe checks prompts against the context itself (ContextLengthError): the
            # tokenizer's own check only printed a warning on stderr before that error.
            wrapped.model_max_length = NO_LENGTH_LIMIT  # mlx-lm forwards it to transformers
        self._has_template = bool(getattr(wrapped, "has_chat_template", False))
        try:
            vocab: dict[str, int] = wrapped.get_vocab()
            longest = max(len(piece) for piece in vocab)
        except Exception:  # a tokenizer without a vocabulary to read: assume long pieces
            longest = 64
        self.max_token_chars = max(1, longest)
        """The longest vocabulary piece, in characters: a token never spells more text."""

    def grammar_tokenizer(self, vocab_size: int, eos_token_ids: Iterable[int]) -> Any:
        """The tokenizer as llguidance's ``LLTokenizer`` (for token masks over the model's
        ``vocab_size`` logits), ending turns with the model's end tokens."""
        import llguidance.hf

        hf = getattr(self._wrapped, "_tokenizer", self._wrapped)
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size,
                                            eos_token=sorted(eos_token_ids))

    @property
    def tool_parser(self) -> Any:
        """mlx-lm's tool-call parser for this model's template (``parse(text, tools)``), its
        start and end markers; None where mlx-lm knows none."""
        wrapped = self._wrapped
        if not getattr(wrapped, "has_tool_calling", False):
            return None
        return (wrapped.tool_parser, wrapped.tool_call_start, wrapped.tool_call_end)

    def copy(self) -> Tokenizer:
        """Another tokenizer like this one, for another caller."""
        return Tokenizer(copy.deepcopy(self._wrapped))

    def render(
        self, messages: Sequence[dict[str, str]], tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` under the chat template, ready for the reply; ``tools``
        (OpenAI-style function descriptions) go to the template's ``tools=``.

        ValueError if the model's template refuses the conversation.
        """
        if self._has_template:
            try:
                ids = self._wrapped.apply_chat_template(
                    list(messages), add_generation_prompt=True, tokenize=True,
                    **({"tools": list(tools)} if tools else {}),
                )
            except Exception as exc:
                raise ValueError(f"the model's chat template refused the conversation: {exc}") \
                    from exc
            return [int(t) for t in ids]
        # A base model without a template gets a plain transcript (and its tools, as JSON).
        head = "".join(f"tool: {json.dumps(t)}\n" for t in tools or ())
        text = head + "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return [int(t) for t in self._wrapped.encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens included."""
        text: str = self._wrapped.decode(list(tokens), skip_special_tokens=False)
        return text


class TextStream:
    """Incremental detokenization that agrees with decoding the whole sequence at once.

    It decodes a short window (the previous emitted tokens as a prefix) so that tokenizers
    which drop or merge leading spaces still produce the right characters.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._model = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        """The text ``token`` completes (empty while it ends inside a character)."""
        self._tokens.append(token)
        prefix_text = self._model.decode(self._tokens[self._prefix : self._read])
        new_text = self._model.decode(self._tokens[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text of the tokens added but not returned yet."""
        prefix_text = self._model.decode(self._tokens[self._prefix : self._read])
        new_text = self._model.decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return new_text[len(prefix_text) :]
