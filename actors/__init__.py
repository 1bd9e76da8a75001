"""troupe.actors: the agent and storage actors, and the MLX engine and its thread."""

from ._agent import Agent, ReplyStream
from ._mlx import ModelInfo

__all__ = ["Agent", "ModelInfo", "ReplyStream"]
