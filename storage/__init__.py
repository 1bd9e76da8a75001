"""troupe.storage: KV blocks (their ids and file format), the store's files, its lock
and the SQLite catalog, and the offline tools behind ``troupe store``.

Nothing here is public: troupe's API is the ``troupe`` module.
"""

__all__: list[str] = []
