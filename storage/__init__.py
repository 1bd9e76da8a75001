"""troupe.storage: KV blocks (their ids and file format) and the SQLite catalog."""

from ._blocks import BLOCK_FORMAT as KV_FORMAT
from ._blocks import DEFAULT_BLOCK_SIZE
from ._catalog import SCHEMA_VERSION, AgentRecord

__all__ = ["DEFAULT_BLOCK_SIZE", "KV_FORMAT", "SCHEMA_VERSION", "AgentRecord"]
