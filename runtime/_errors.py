"""troupe's exceptions: a small set, each meaning one thing.

Bad arguments (an empty message, a negative temperature) raise ValueError or TypeError;
everything else troupe raises derives from TroupeError.
"""

from __future__ import annotations


class TroupeError(Exception):
    """Base class of every error troupe raises on its own account."""


class RuntimeClosedError(TroupeError):
    """The runtime is closed (or closing): it takes no new work."""


class AgentNotFoundError(TroupeError, LookupError):
    """No agent has this id."""


class AgentExistsError(TroupeError):
    """An agent with this id exists already (in memory or in the store)."""


class ContextLengthError(TroupeError, ValueError):
    """A turn would not fit the model's context window.

    Carries ``needed`` (prompt tokens plus max_tokens) and ``limit``.
    """

    def __init__(self, message: str, *, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


class AgentFailedError(TroupeError):
    """The agent's actor stopped on an unexpected error; its cause is ``__cause__``.

    The rest of the runtime keeps serving; this agent takes no more turns.
    """


class ModelLoadError(TroupeError):
    """The model could not be loaded (missing directory, unreadable files, bad config)."""


class StoreError(TroupeError):
    """The store could not be opened, read or written."""


class AgentDamagedError(StoreError):
    """The store's record of one agent is inconsistent: a message changed or missing, a
    count that does not match. Carries ``agent_id`` and ``problems``.

    Only that agent is refused; the others keep working. ``troupe store repair DIR`` keeps
    each damaged agent's transcript up to its first bad message (and prints the rest).
    """

    def __init__(self, agent_id: str, problems: list[str]) -> None:
        super().__init__(
            f"agent {agent_id!r} is damaged in the store: {'; '.join(problems)} "
            "(`troupe store repair` keeps its transcript up to the first bad message)"
        )
        self.agent_id = agent_id
        self.problems = tuple(problems)


class EngineError(TroupeError):
    """The MLX engine thread failed; turns in flight end with this error."""


class IncompleteReplyError(TroupeError):
    """A constrained turn (``schema=``, ``choices=``, ``regex=``, a required tool call)
    ended before its value was whole: ``max_tokens`` ran out, or a stop string cut it.

    Carries ``text`` (the partial reply), ``tokens`` and ``finish_reason``, and the turn's
    ``prompt_tokens`` and ``cached_tokens`` as a Reply counts them (so that a server can
    still report usage). The turn is not committed: the transcript is left as it was (as
    for a cancelled turn), so the caller can try again with more ``max_tokens``.
    """

    def __init__(self, message: str, *, text: str, tokens: tuple[int, ...],
                 finish_reason: str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        super().__init__(message)
        self.text = text
        self.tokens = tokens
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
