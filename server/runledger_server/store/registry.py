"""The registry store interface: what the registry use cases need from metadata storage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runledger_server.domain.gates import Decision, GateSpec
from runledger_server.domain.lineage import Lineage
from runledger_server.store.entities import Page
from runledger_server.store.registry_entities import (
    Alias,
    AliasHistoryEntry,
    AliasOutcome,
    ArtifactRef,
    Gate,
    GateResult,
    ModelVersion,
    RegisteredModel,
    ServingTarget,
)


class RegistryStore(Protocol):
    """Each method is one transaction; refusals raise DomainError and change nothing.

    The alias methods are the exception the API asks for: a refused promotion is still appended to the
    alias history, so `set_alias` returns the refused decision (committed) instead of raising it.
    """

    local_reads: bool
    """True when `serving_target` reads a local file, never the network: a few tens of microseconds that cannot
    hang, so the transport may run it on its event loop instead of paying for a hop to a worker thread."""

    def create_model(self, model_id: str, description: str, tags: dict[str, str]) -> RegisteredModel: ...

    def get_model(self, model_id: str) -> RegisteredModel: ...

    def list_models(self, page_size: int, page_token: str) -> Page[RegisteredModel]: ...

    def create_version(
        self,
        model_id: str,
        run_id: str,
        artifact: ArtifactRef,
        lineage: Lineage,
        lineage_fingerprint: str,
        description: str,
    ) -> ModelVersion:
        """Allocate the model's next version number from its counter row in the same transaction."""
        ...

    def create_version_of_file(self, model_id: str, run_id: str, path: str, description: str) -> ModelVersion | None:
        """`create_version` of the file recorded at the run's `path`, with the run's lineage, both read in one
        query before the write (the one method of two transactions: a complete lineage and a recorded file never
        change). None, having written nothing, unless the model, the run, its complete lineage and the file are
        all there: the caller then finds out which is missing."""
        ...

    def get_version(self, model_id: str, version: int) -> ModelVersion: ...

    def list_versions(self, model_id: str, page_size: int, page_token: str) -> Page[ModelVersion]:
        """Newest first."""
        ...

    def create_gate(self, model_id: str, spec: GateSpec) -> Gate:
        """Idempotent for identical fields; ALREADY_EXISTS naming the first differing field otherwise."""
        ...

    def get_gate(self, model_id: str, gate_id: str) -> Gate: ...

    def record_gate_result(self, model_id: str, gate_id: str, version: int, score: float, actor: str) -> GateResult:
        """Idempotent for the same score; ALREADY_EXISTS for a different one."""
        ...

    def evaluate_promotion(
        self, model_id: str, alias: str, version: int, gate_id: str, expected_revision: int | None
    ) -> Decision:
        """The decision `set_alias` would take now; writes nothing."""
        ...

    def set_alias(
        self, model_id: str, alias: str, version: int, gate_id: str, expected_revision: int | None, actor: str
    ) -> AliasOutcome:
        """Lock the alias, decide, move it or not, append the decision to the history; one transaction."""
        ...

    def rollback_alias(
        self, model_id: str, alias: str, actor: str, expected_revision: int | None = None
    ) -> AliasOutcome: ...

    def delete_alias(self, model_id: str, alias: str, expected_revision: int | None, actor: str) -> AliasOutcome: ...

    def alias_history(self, model_id: str, alias: str, page_size: int, page_token: str) -> Page[AliasHistoryEntry]:
        """Oldest first."""
        ...

    def serving_target(self, model_id: str, alias: str) -> ServingTarget:
        """The alias (revision 0 and version 0 when never set) and the version it points at."""
        ...

    def alias_changes(
        self, model_id: str, alias: str, after_revision: int, before_revision: int
    ) -> list[ServingTarget]:
        """The alias's states after each change with a revision strictly between the two, oldest first; each
        version's `aliases` holds only this alias (which pointed at it then)."""
        ...

    def alias_revisions(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Current revisions of many aliases in one cheap read (absent aliases are left out)."""
        ...

    def get_alias(self, model_id: str, alias: str) -> Alias | None: ...
