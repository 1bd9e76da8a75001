"""troupe: an async actor runtime for LLM agents on MLX.

Each agent is a long-lived actor holding its own KV cache, so a turn prefills only what
is new; one scheduler batches every agent's decoding onto one MLX model; a store keeps
agents, transcripts and caches across runs. Works under trio and asyncio (anyio).
"""

# Before anything imports MLX: bind MLX to OpenBLAS when the machine has it.
from ._blas import BlasStatus, BlasWarning, load_blas

BLAS: BlasStatus = load_blas()

from ._embedded import make_model  # noqa: E402
from ._errors import (  # noqa: E402
    AgentDamagedError,
    AgentExistsError,
    AgentFailedError,
    AgentNotFoundError,
    ContextLengthError,
    EngineError,
    IncompleteReplyError,
    ModelLoadError,
    RuntimeClosedError,
    StoreError,
    TroupeError,
)
from ._records import (  # noqa: E402
    AgentStatistics,
    Message,
    Reply,
    RuntimeStatistics,
    Sampling,
    ToolCall,
)
from ._runtime import Runtime, open_runtime  # noqa: E402
from ._serve import ServeOptions, serve  # noqa: E402
from ._tools import Tool  # noqa: E402
from .actors._agent import Agent, ReplyStream  # noqa: E402
from .actors._mlx import ModelInfo  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BLAS",
    "Agent",
    "AgentDamagedError",
    "AgentExistsError",
    "AgentFailedError",
    "AgentNotFoundError",
    "AgentStatistics",
    "BlasStatus",
    "BlasWarning",
    "ContextLengthError",
    "EngineError",
    "IncompleteReplyError",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "Reply",
    "ReplyStream",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeStatistics",
    "Sampling",
    "ServeOptions",
    "StoreError",
    "Tool",
    "ToolCall",
    "TroupeError",
    "__version__",
    "make_model",
    "open_runtime",
    "serve",
]


def _claim_public_names() -> None:
    # Each public class and function says it is troupe's (reprs, docs, pickles), not the
    # private module's it happens to live in, as trio does.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) or callable(obj):
            obj.__module__ = __name__


_claim_public_names()
