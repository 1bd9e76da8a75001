"""troupe.actors: the agent, scheduler and storage actors, and the MLX engine thread."""

from ._agent import Agent, ReplyStream
from ._mlx import ModelInfo

__all__ = ["Agent", "ModelInfo", "ReplyStream"]
