"""Registry use cases: lineage-checked versions, frozen gates, gate-guarded aliases, the serving lookup."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from runledger_server.domain import artifact_paths, gates, names, paging
from runledger_server.domain.errors import Aborted, DomainError, FailedPrecondition, InvalidArgument, NotFound
from runledger_server.domain.gates import Decision, GateSpec
from runledger_server.domain.lineage import Lineage, drifted_fields, validate
from runledger_server.domain.sweeps import Direction, require_finite
from runledger_server.store.entities import Page
from runledger_server.store.registry import RegistryStore
from runledger_server.store.registry_entities import (
    AliasHistoryEntry,
    AliasOutcome,
    ArtifactRef,
    Gate,
    GateResult,
    ModelVersion,
    RegisteredModel,
    ServingTarget,
)

_LOGGER = logging.getLogger(__name__)

MAX_DESCRIPTION = 8192


class RunLookup(Protocol):
    def run_lineage(self, run_id: str) -> Lineage: ...


class ArtifactDescription(Protocol):
    @property
    def sha256(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def uri(self) -> str: ...


class ArtifactDescriber(Protocol):
    """What a run path holds: a recorded file, or a directory addressed by the digest of its manifest."""

    def describe(
        self, run_id: str, path: str, field: str = ..., before_publish: Callable[[], object] | None = ...
    ) -> ArtifactDescription: ...


AliasListener = Callable[[str, str], None]


class RegistryService:
    def __init__(self, store: RegistryStore, runs: RunLookup, artifacts: ArtifactDescriber) -> None:
        self.store = store
        self.runs = runs
        self.artifacts = artifacts
        self._listeners: list[AliasListener] = []

    def on_alias_change(self, listener: AliasListener) -> None:
        """Call `listener(model_id, alias)` after every committed change of an alias made here."""
        self._listeners.append(listener)

    # ---- models ------------------------------------------------------------------------------
    def create_model(self, model_id: str, description: str, tags: dict[str, str]) -> RegisteredModel:
        names.slug(model_id, "model_id")
        _check_description(description)
        for k, v in tags.items():
            names.key(k, "tags")
            names.text_value(v, f"tags[{k}]")
        return self.store.create_model(model_id, description, tags)

    def get_model(self, name: str) -> RegisteredModel:
        try:
            return self.store.get_model(names.model_id(name, "name"))
        except NotFound as exc:  # the store names `model`, the field of most requests; this one's is `name`
            raise _naming(exc, "name") from None

    def list_models(self, page_size: int, page_token: str) -> Page[RegisteredModel]:
        return self.store.list_models(paging.page_size(page_size), page_token)

    # ---- versions ----------------------------------------------------------------------------
    def create_version(self, model: str, run_id: str, artifact_path: str, description: str) -> ModelVersion:
        """Register a run's artifact as the model's next version; the run's lineage must be complete."""
        model_id = names.model_id(model)
        run_id = names.run_id(run_id)
        path = _artifact_path(artifact_path)
        _check_description(description)
        # A file of a run whose lineage is complete, the usual case, takes one read and one write; a directory
        # (its manifest is built and published first) and every refusal take the checked path.
        version = self.store.create_version_of_file(model_id, run_id, path, description)
        if version is None:
            version = self._create_version_checked(model_id, run_id, path, description)
        _LOGGER.info("registered models/%s/versions/%d from runs/%s", model_id, version.version, run_id)
        return version

    def _create_version_checked(self, model_id: str, run_id: str, path: str, description: str) -> ModelVersion:
        """Each precondition read and checked on its own, so that a refusal names the first one missing.

        The run, its lineage and its artifact come before the model: a client that creates a missing model on
        NOT_FOUND `model` and asks again then never creates a model for a registration that fails anyway.
        Models are never deleted, and every check here is a read, so a refusal never waits for the write lock
        (SQLite); a directory's manifest is published only once the model is known to exist."""

        lineage = self.runs.run_lineage(run_id)
        missing = lineage.missing_fields()
        described = (
            None
            if missing
            else self.artifacts.describe(
                run_id, path, "artifact_path", before_publish=lambda: self.store.get_model(model_id)
            )
        )
        if missing:
            raise FailedPrecondition(
                f"runs/{run_id} has broken lineage: missing {', '.join(missing)}; "
                "record them with SetLineage before registering a version",
                reason="BROKEN_LINEAGE",
                field="run_id",
                metadata={"missingFields": ",".join(missing), "run": f"runs/{run_id}"},
            )
        self.store.get_model(model_id)  # a file's description published nothing, and checked no model
        fingerprint = lineage.fingerprint()
        assert fingerprint is not None and described is not None
        artifact = ArtifactRef(path, described.sha256, described.size, described.uri)
        return self.store.create_version(model_id, run_id, artifact, lineage, fingerprint, description)

    def get_version(self, name: str) -> ModelVersion:
        """By `models/{m}/versions/{n}` or `models/{m}@{alias}`."""
        model_id, version, alias = names.version_ref(name)
        try:
            if alias is not None:
                target = self.serving_target(f"models/{model_id}", alias)
                assert target.version is not None
                return target.version
            assert version is not None
            return self.store.get_version(model_id, version)
        except NotFound as exc:  # a missing model, version or alias: all of them are spelled in `name` here
            raise _naming(exc, "name") from None

    def list_versions(self, model: str, page_size: int, page_token: str) -> Page[ModelVersion]:
        return self.store.list_versions(names.model_id(model), paging.page_size(page_size), page_token)

    def verify_lineage(self, model: str, version: int, claimed: Lineage) -> tuple[bool, str, str, list[str]]:
        """(match, expected fingerprint, claimed fingerprint or "", drifted or missing fields)."""
        model_id = names.model_id(model)
        _check_version(version)
        validate(claimed)
        v = self.store.get_version(model_id, version)
        actual = claimed.fingerprint() or ""
        drifted = drifted_fields(v.lineage, claimed)
        return actual == v.lineage_fingerprint and not drifted, v.lineage_fingerprint, actual, drifted

    # ---- gates -------------------------------------------------------------------------------
    def create_gate(
        self,
        model: str,
        gate_id: str,
        suite_fingerprint: str,
        metric: str,
        direction: Direction | None,
        threshold: float,
    ) -> Gate:
        model_id = names.model_id(model)
        names.slug(gate_id, "gate_id")
        if not suite_fingerprint or len(suite_fingerprint) > 256 or "\x00" in suite_fingerprint:
            raise InvalidArgument("suite_fingerprint is required (1-256 characters)", field="suite_fingerprint")
        names.key(metric, "metric")
        if direction is None:
            raise InvalidArgument("direction is required: DIRECTION_MAXIMIZE or DIRECTION_MINIMIZE", field="direction")
        threshold = require_finite(threshold, "threshold")
        return self.store.create_gate(model_id, GateSpec(gate_id, suite_fingerprint, metric, direction, threshold))

    def get_gate(self, name: str) -> Gate:
        model_id, gate_id = names.gate_ref(name)
        try:
            return self.store.get_gate(model_id, gate_id)
        except NotFound as exc:
            raise _naming(exc, "name") from None

    def record_gate_result(self, model: str, gate_id: str, version: int, score: float, actor: str) -> GateResult:
        model_id = names.model_id(model)
        names.slug(gate_id, "gate_id")
        _check_version(version)
        score = require_finite(score, "score")
        return self.store.record_gate_result(model_id, gate_id, version, score, actor)

    # ---- aliases -----------------------------------------------------------------------------
    def evaluate_promotion(
        self, model: str, alias: str, version: int, gate_id: str, expected_revision: int | None
    ) -> Decision:
        model_id, alias = self._alias_args(model, alias, version, gate_id, expected_revision)
        return self.store.evaluate_promotion(model_id, alias, version, gate_id, expected_revision)

    def set_alias(
        self, model: str, alias: str, version: int, gate_id: str, expected_revision: int | None, actor: str
    ) -> AliasOutcome:
        """Move the alias if the gate admits the version. A refusal is committed to the history, then raised."""
        model_id, alias = self._alias_args(model, alias, version, gate_id, expected_revision)
        outcome = self.store.set_alias(model_id, alias, version, gate_id, expected_revision, actor)
        decision = outcome.decision
        assert decision is not None
        if not decision.promoted:
            _LOGGER.info(
                "models/%s/aliases/%s: version %d refused (%s) for %s", model_id, alias, version, decision.reason, actor
            )
            raise refusal(decision, gate_id, outcome.alias.revision)
        _LOGGER.info(
            "models/%s/aliases/%s -> version %d (revision %d) by %s",
            model_id,
            alias,
            version,
            outcome.alias.revision,
            actor,
        )
        self._changed(model_id, alias)
        return outcome

    def rollback_alias(self, model: str, alias: str, actor: str, expected_revision: int | None = None) -> AliasOutcome:
        model_id = names.model_id(model)
        alias = names.slug(alias, "alias")
        _check_expected_revision(expected_revision)
        outcome = self.store.rollback_alias(model_id, alias, actor, expected_revision)
        _LOGGER.info(
            "models/%s/aliases/%s rolled back to version %d by %s", model_id, alias, outcome.alias.version, actor
        )
        self._changed(model_id, alias)
        return outcome

    def delete_alias(self, model: str, alias: str, expected_revision: int | None, actor: str) -> AliasOutcome:
        model_id = names.model_id(model)
        alias = names.slug(alias, "alias")
        _check_expected_revision(expected_revision)
        outcome = self.store.delete_alias(model_id, alias, expected_revision, actor)
        _LOGGER.info("models/%s/aliases/%s deleted by %s", model_id, alias, actor)
        self._changed(model_id, alias)
        return outcome

    def alias_history(self, model: str, alias: str, page_size: int, page_token: str) -> Page[AliasHistoryEntry]:
        return self.store.alias_history(
            names.model_id(model), names.slug(alias, "alias"), paging.page_size(page_size), page_token
        )

    @property
    def serving_reads_are_local(self) -> bool:
        """The serving lookup never waits on the network (see RegistryStore.local_reads)."""
        return self.store.local_reads

    def serving_target(self, model: str, alias: str) -> ServingTarget:
        """The serving lookup: NOT_FOUND when the alias points at nothing."""
        target = self.watch_state(model, alias)
        if target.version is None:
            raise NotFound(f"models/{target.alias.model_id}/aliases/{target.alias.alias} is not set", field="alias")
        return target

    def watch_state(self, model: str, alias: str) -> ServingTarget:
        """The alias now, set or not (revision 0 and version 0 when it never was)."""
        return self.store.serving_target(names.model_id(model), names.slug(alias, "alias"))

    def watch_changes(self, model: str, alias: str, seen_revision: int) -> list[ServingTarget]:
        """What a watcher that last saw `seen_revision` (-1: nothing yet) is owed, oldest first: the state after
        every change it missed, then the alias now (the same as its last one when nothing changed)."""
        model_id, alias = names.model_id(model), names.slug(alias, "alias")
        now = self.store.serving_target(model_id, alias)
        if seen_revision < 0 or now.alias.revision <= seen_revision + 1:
            return [now]
        return [*self.store.alias_changes(model_id, alias, seen_revision, now.alias.revision), now]

    def alias_revisions(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return self.store.alias_revisions(keys)

    def _alias_args(
        self, model: str, alias: str, version: int, gate_id: str, expected_revision: int | None
    ) -> tuple[str, str]:
        model_id = names.model_id(model)
        alias = names.slug(alias, "alias")
        _check_version(version)
        names.slug(gate_id, "gate_id")
        _check_expected_revision(expected_revision)
        return model_id, alias

    def _changed(self, model_id: str, alias: str) -> None:
        for listener in self._listeners:
            try:
                listener(model_id, alias)
            except Exception:
                _LOGGER.exception("alias listener failed for models/%s/aliases/%s", model_id, alias)


def refusal(decision: Decision, gate_id: str, revision: int) -> DomainError:
    """The status a refused promotion answers with: FAILED_PRECONDITION, or ABORTED for a stale revision."""
    metadata = {
        "candidateVersion": str(decision.candidate_version),
        "gateId": gate_id,
        "threshold": repr(decision.threshold),
        "direction": decision.direction.value,
        "revision": str(revision),
    }
    if decision.candidate_score is not None:
        metadata["candidateScore"] = repr(decision.candidate_score)
    if decision.incumbent_version is not None:
        metadata["incumbentVersion"] = str(decision.incumbent_version)
    if decision.incumbent_score is not None:
        metadata["incumbentScore"] = repr(decision.incumbent_score)
    if decision.reason == gates.STALE_REVISION:
        return Aborted(decision.message, reason=decision.reason, field="expected_revision", metadata=metadata)
    field = "gate_id" if decision.reason == gates.GATE_NOT_RECORDED else "version"
    return FailedPrecondition(decision.message, reason=decision.reason, field=field, metadata=metadata)


def _check_version(version: int) -> None:
    if version <= 0:
        raise InvalidArgument(f"version must be a positive version number, got {version}", field="version")


def _check_expected_revision(expected_revision: int | None) -> None:
    if expected_revision is not None and expected_revision < 0:
        raise InvalidArgument(
            f"expected_revision must be >= 0 (0: the alias must not exist), got {expected_revision}",
            field="expected_revision",
        )


def _check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise InvalidArgument(f"description must be at most {MAX_DESCRIPTION} characters, no NUL", field="description")


def _artifact_path(path: str) -> str:
    """A file or directory of the run (one trailing `/` dropped); the run's root is not a model."""
    if not path:
        raise InvalidArgument("artifact_path is required (a file or directory of the run)", field="artifact_path")
    return artifact_paths.directory_path(path, "artifact_path")


def _naming(exc: NotFound, field: str) -> NotFound:
    """The same refusal, naming the request field that held the missing part."""
    return NotFound(exc.message, reason=exc.reason, metadata={**exc.metadata, "field": field}, field=field)
