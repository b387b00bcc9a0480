"""Every table of the metadata store, gathered on one Base for migrations."""

from __future__ import annotations

from runledger_server.backends.sql import artifact_tables, registry_tables, tracking_tables
from runledger_server.backends.sql.base import Base

__all__ = ["Base", "artifact_tables", "registry_tables", "tracking_tables"]
