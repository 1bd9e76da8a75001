"""troupe.actors: the agent and storage actors, and the MLX engine and its thread.

Nothing here is public: troupe's API is the ``troupe`` module, which exports each public
name once (tests/test_package.py pins that).
"""

__all__: list[str] = []
