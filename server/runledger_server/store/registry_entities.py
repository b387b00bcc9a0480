"""Entities the registry store returns: frozen dataclasses, free of SQL and protobuf."""

from __future__ import annotations

from dataclasses import dataclass

from runledger_server.domain.gates import Decision, GateSpec
from runledger_server.domain.lineage import Lineage


@dataclass(frozen=True)
class RegisteredModel:
    model_id: str
    description: str
    tags: dict[str, str]
    latest_version: int
    create_time_us: int
    update_time_us: int


@dataclass(frozen=True)
class ArtifactRef:
    """What a version points at: a recorded file, or a directory addressed by its manifest digest."""

    path: str
    sha256: str
    size: int
    uri: str


@dataclass(frozen=True)
class ModelVersion:
    model_id: str
    version: int
    run_id: str
    artifact: ArtifactRef
    lineage: Lineage
    lineage_fingerprint: str
    description: str
    aliases: tuple[str, ...]
    create_time_us: int

    @property
    def footprint(self) -> int:
        """Roughly the bytes it holds, for caches that bound their memory: its text, which dominates."""
        lineage = self.lineage
        texts = (lineage.config, lineage.data_version, lineage.code_commit, lineage.base_model, self.description)
        return 512 + sum(len(t or "") for t in texts) + len(self.artifact.uri) + len(self.artifact.path)


@dataclass(frozen=True)
class Gate:
    model_id: str
    spec: GateSpec
    create_time_us: int


@dataclass(frozen=True)
class GateResult:
    model_id: str
    gate_id: str
    version: int
    score: float
    actor: str
    create_time_us: int


@dataclass(frozen=True)
class Alias:
    """`version` 0: the alias points at nothing (never set, or deleted). `revision` 0: it was never set."""

    model_id: str
    alias: str
    version: int
    revision: int
    gate_id: str
    update_time_us: int

    @property
    def is_set(self) -> bool:
        return self.version != 0


@dataclass(frozen=True)
class AliasHistoryEntry:
    model_id: str
    alias: str
    sequence: int
    action: str  # domain.gates.Action
    revision: int
    from_version: int
    to_version: int
    gate_id: str
    candidate_score: float | None
    incumbent_score: float | None
    reason: str
    actor: str
    create_time_us: int


@dataclass(frozen=True)
class AliasOutcome:
    """The result of one alias transaction: the alias after it, and the history entry it appended."""

    alias: Alias
    entry: AliasHistoryEntry
    decision: Decision | None = None


@dataclass(frozen=True)
class ServingTarget:
    """The serving lookup's answer: the alias and the version it points at (None when unset)."""

    alias: Alias
    version: ModelVersion | None
