"""troupe.storage: the on-disk KV cache format and the SQLite catalog."""

from ._catalog import SCHEMA_VERSION, AgentRecord
from ._kvfile import FORMAT as KV_FORMAT

__all__ = ["KV_FORMAT", "SCHEMA_VERSION", "AgentRecord"]
