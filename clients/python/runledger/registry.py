"""The model registry from Python: register a run's artifact, gate it, move aliases, resolve and watch them.

>>> reg = Registry(channel)
>>> v = reg.register(run_id, model="qwen3-8b-sft", artifact_path="adapter/")
>>> reg.record_gate_result("qwen3-8b-sft", "mmlu-frozen", v.version, 0.66)
>>> reg.set_alias("qwen3-8b-sft", "production", v.version, gate="mmlu-frozen")
>>> reg.resolve("qwen3-8b-sft@production").artifact_uri

A refused promotion raises `PromotionRefused` (FAILED_PRECONDITION) with the reason and both scores; a lost
compare-and-swap raises `StaleRevision` (ABORTED). Every other refusal is a typed `runledger.errors` error.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from runledger import _convert, errors
from runledger._retry import RetryPolicy, call_with_retry, client_closed
from runledger.v1 import registry_pb2, registry_service_pb2 as pb, registry_service_pb2_grpc

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

PROMOTION_REASONS = frozenset({"GATE_NOT_RECORDED", "GATE_FAILED", "NOT_BETTER_THAN_INCUMBENT", "INCUMBENT_NOT_SCORED"})


def _float(metadata: Mapping[str, str], key: str) -> float | None:
    value = metadata.get(key)
    return float(value) if value else None


def _int(metadata: Mapping[str, str], key: str) -> int | None:
    value = metadata.get(key)
    return int(value) if value else None


class PromotionRefused(errors.FailedPrecondition):
    """The gate did not admit the version: `reason` is GATE_NOT_RECORDED, GATE_FAILED,
    NOT_BETTER_THAN_INCUMBENT or INCUMBENT_NOT_SCORED. The refusal is in the alias history all the same."""

    @property
    def candidate_score(self) -> float | None:
        return _float(self.metadata, "candidateScore")

    @property
    def incumbent_score(self) -> float | None:
        return _float(self.metadata, "incumbentScore")

    @property
    def incumbent_version(self) -> int | None:
        return _int(self.metadata, "incumbentVersion")

    @property
    def threshold(self) -> float | None:
        return _float(self.metadata, "threshold")


class StaleRevision(errors.Aborted):
    """`expected_revision` no longer matches: someone changed the alias first. Re-read it and decide again."""

    @property
    def revision(self) -> int | None:
        """The alias's current revision."""
        return _int(self.metadata, "revision")


def _typed(err: grpc.RpcError) -> errors.RunledgerError:
    exc = errors.from_rpc_error(err)
    cls: type[errors.RunledgerError] | None = None
    if exc.code is grpc.StatusCode.FAILED_PRECONDITION and exc.reason in PROMOTION_REASONS:
        cls = PromotionRefused
    elif exc.code is grpc.StatusCode.ABORTED and exc.reason == "STALE_REVISION":
        cls = StaleRevision
    if cls is None:
        return exc
    typed = cls(exc.message, code=exc.code, reason=exc.reason, metadata=exc.metadata, domain=exc.domain)
    typed.__cause__ = exc.__cause__
    return typed


def _model(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


class AliasWatch:
    """An alias's current state, then one message per change, until `close()` (also a context manager).

    The watch outlives server restarts and replica moves: when the stream ends with UNAVAILABLE (a server
    stopping ends its watches that way) it is opened again with backoff, and the current state the new stream
    starts with is passed on only if it differs from the last one seen. It gives up, raising Unavailable,
    after `budget` seconds without a server. Leaving the loop (`break`, an exception in its body) ends the
    watch too, here and on the server.
    """

    def __init__(self, open_call: Callable[[], Any], policy: RetryPolicy, budget: float | None) -> None:
        self._open = open_call
        self._policy = policy
        self._budget = math.inf if budget is None else budget
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call = open_call()

    def __iter__(self) -> Iterator[pb.WatchAliasResponse]:
        seen = -1  # the revision last passed on
        failures = 0
        down_since = 0.0
        try:
            while True:
                try:
                    for message in self._call:
                        failures = 0
                        if message.alias.revision != seen:
                            seen = message.alias.revision
                            yield message
                    return  # the server ended the stream without an error
                except grpc.RpcError as exc:
                    if self._closed.is_set():  # closed by us
                        return
                    err = _typed(exc)
                    if err.code is not grpc.StatusCode.UNAVAILABLE:
                        raise err from None
                failures += 1
                now = time.monotonic()
                down_since = now if failures == 1 else down_since
                delay = self._policy.delay(failures, random.random())
                if now + delay - down_since > self._budget:
                    raise err from None
                _LOGGER.info("alias watch: %s; watching again in %.2f s", err, delay)
                if self._closed.wait(delay):
                    return
                with self._lock:
                    if self._closed.is_set():
                        return
                    try:
                        self._call = self._open()
                    except ValueError as exc:  # grpc's word for a closed channel
                        raise client_closed(exc) from None
        finally:
            self.close()

    @property
    def closed(self) -> bool:
        """Whether the watch has ended: closed, or its loop left or ended (an error, or the server for good)."""
        return self._closed.is_set()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            self._call.cancel()

    def __enter__(self) -> AliasWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registry:
    """RegistryService calls over a channel, with typed errors and plain Python arguments."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout: float | None = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = None,
    ):
        """`metadata` goes with every call, e.g. `(("x-runledger-actor", "release-bot"),)` to name who acts.

        Every call waits up to `timeout` for the server to be reachable before it is sent (a write made while a
        server restarts goes through once it is back). Reads (lookups, listings, evaluations), and writes whose
        repeat changes nothing (create_gate, record_gate_result), are also retried on UNAVAILABLE until
        `timeout`; other writes are not (a reply lost on the way back must not promote or register twice).
        """
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._channel = channel
        self.timeout = timeout
        self._metadata = tuple(metadata)
        self._retry = retry or RetryPolicy()

    def _call(self, method: Callable[..., T], request: Any, *, repeatable: bool = False) -> T:
        """`repeatable`: safe to repeat (a read, or a write whose repeat changes nothing), so retried on UNAVAILABLE."""
        return call_with_retry(
            lambda remaining: method(request, timeout=remaining, metadata=self._metadata, wait_for_ready=True),
            self._retry,
            idempotent=repeatable,
            budget=self.timeout,
            target="registry",
            typed=_typed,
            channel=self._channel,
        )

    # ---- models and versions ----------------------------------------------------------------
    def create_model(
        self, model_id: str, *, description: str = "", tags: Mapping[str, Any] | None = None, exist_ok: bool = False
    ) -> registry_pb2.RegisteredModel:
        request = pb.CreateRegisteredModelRequest(
            model_id=model_id, description=description, tags=_convert.string_map(tags, "tags")
        )
        try:
            return self._call(self._stub.CreateRegisteredModel, request)
        except errors.AlreadyExists:
            if not exist_ok:
                raise
            return self.get_model(model_id)

    def get_model(self, model: str) -> registry_pb2.RegisteredModel:
        return self._call(
            self._stub.GetRegisteredModel, pb.GetRegisteredModelRequest(name=_model(model)), repeatable=True
        )

    def register(
        self, run_id: str, *, model: str, artifact_path: str, description: str = "", create_model: bool = True
    ) -> registry_pb2.ModelVersion:
        """Register a run's file or directory as the model's next version (the model is created if needed).
        Raises FailedPrecondition `BROKEN_LINEAGE` (metadata `missingFields`) when the run's lineage is incomplete."""
        request = pb.CreateModelVersionRequest(
            model=_model(model), run_id=run_id, artifact_path=artifact_path, description=description
        )
        try:  # the model usually exists: one call, not three (create, refused as existing, get)
            return self._call(self._stub.CreateModelVersion, request)
        except errors.NotFound as exc:
            if not create_model or exc.metadata.get("field") != "model":
                raise
        self.create_model(model.removeprefix("models/"), exist_ok=True)
        return self._call(self._stub.CreateModelVersion, request)

    def list_models(self, *, page_size: int = 0) -> Iterator[registry_pb2.RegisteredModel]:
        """Every registered model, in name order, fetched page by page."""
        token = ""
        while True:
            request = _convert.request(pb.ListRegisteredModelsRequest, page_size=page_size, page_token=token)
            page = self._call(self._stub.ListRegisteredModels, request, repeatable=True)
            yield from page.registered_models
            token = page.next_page_token
            if not token:
                return

    def get_version(self, model: str, version: int) -> registry_pb2.ModelVersion:
        name = f"{_model(model)}/versions/{version}"
        return self._call(self._stub.GetModelVersion, pb.GetModelVersionRequest(name=name), repeatable=True)

    def list_versions(self, model: str, *, page_size: int = 0) -> Iterator[registry_pb2.ModelVersion]:
        """Newest first, fetched page by page."""
        token = ""
        while True:
            request = _convert.request(
                pb.ListModelVersionsRequest, model=_model(model), page_size=page_size, page_token=token
            )
            page = self._call(self._stub.ListModelVersions, request, repeatable=True)
            yield from page.model_versions
            token = page.next_page_token
            if not token:
                return

    def verify_lineage(self, model: str, version: int, lineage: Mapping[str, Any]) -> pb.VerifyLineageResponse:
        """Does a claimed reproduction's lineage match the version's? `.match`, `.drifted_fields`."""
        request = _convert.request(
            pb.VerifyLineageRequest, model=_model(model), version=version, lineage=_convert.lineage_to_proto(lineage)
        )
        return self._call(self._stub.VerifyLineage, request, repeatable=True)

    # ---- gates -------------------------------------------------------------------------------
    def create_gate(
        self,
        model: str,
        gate_id: str,
        *,
        suite_fingerprint: str,
        metric: str,
        threshold: float,
        direction: str | int = "MAXIMIZE",
    ) -> registry_pb2.Gate:
        """A frozen gate; creating it again with the same fields returns it, any difference is AlreadyExists."""
        request = pb.CreateGateRequest(
            model=_model(model),
            gate_id=gate_id,
            suite_fingerprint=suite_fingerprint,
            metric=metric,
            direction=_convert.direction(direction),
            threshold=_convert.number(threshold, "threshold"),
        )
        return self._call(self._stub.CreateGate, request, repeatable=True)  # the same gate again returns it

    def record_gate_result(self, model: str, gate_id: str, version: int, score: float) -> registry_pb2.GateResult:
        """The gate's own score for a version; immutable (the same score again is a no-op)."""
        request = _convert.request(
            pb.RecordGateResultRequest,
            model=_model(model),
            gate_id=gate_id,
            version=version,
            score=_convert.number(score, "score"),
        )
        return self._call(self._stub.RecordGateResult, request, repeatable=True)  # the same score again is a no-op

    # ---- aliases -----------------------------------------------------------------------------
    def set_alias(
        self, model: str, alias: str, version: int, *, gate: str, expected_revision: int | None = None
    ) -> pb.SetAliasResponse:
        """Move the alias if the gate admits the version; raises PromotionRefused or StaleRevision otherwise."""
        request = _convert.request(
            pb.SetAliasRequest,
            model=_model(model),
            alias=alias,
            version=version,
            gate_id=gate,
            expected_revision=expected_revision,
        )
        return self._call(self._stub.SetAlias, request)

    def evaluate_promotion(
        self, model: str, alias: str, version: int, *, gate: str, expected_revision: int | None = None
    ) -> registry_pb2.PromotionDecision:
        """The decision set_alias would take now, without moving anything."""
        request = _convert.request(
            pb.EvaluatePromotionRequest,
            model=_model(model),
            alias=alias,
            version=version,
            gate_id=gate,
            expected_revision=expected_revision,
        )
        return self._call(self._stub.EvaluatePromotion, request, repeatable=True).decision

    def rollback(self, model: str, alias: str, *, expected_revision: int | None = None) -> registry_pb2.Alias:
        """Back to the version the alias held before its last change (repeat to go further back).

        With `expected_revision` (the revision last seen), a rollback someone else already made is not undone a
        second time: StaleRevision instead, and nothing moves."""
        request = _convert.request(
            pb.RollbackAliasRequest, model=_model(model), alias=alias, expected_revision=expected_revision
        )
        return self._call(self._stub.RollbackAlias, request).alias

    def delete_alias(self, model: str, alias: str, *, expected_revision: int | None = None) -> None:
        request = _convert.request(
            pb.DeleteAliasRequest, model=_model(model), alias=alias, expected_revision=expected_revision
        )
        self._call(self._stub.DeleteAlias, request)

    def resolve(self, ref: str) -> registry_pb2.ModelVersion:
        """The version `"model@alias"` (or `models/model@alias`, `model/versions/3`) points at; NotFound when the
        alias is unset."""
        if not isinstance(ref, str) or not ref.strip():
            raise errors.InvalidArgument(
                f"a model version reference like 'qwen3-8b-sft@production' is required, got {ref!r}",
                reason="INVALID_ARGUMENT",
                metadata={"field": "name"},
            )
        return self._call(self._stub.GetModelVersion, pb.GetModelVersionRequest(name=_model(ref)), repeatable=True)

    def lookup(self, model: str, alias: str) -> pb.GetModelVersionByAliasResponse:
        """The serving lookup: the version and the alias with its revision."""
        request = pb.GetModelVersionByAliasRequest(model=_model(model), alias=alias)
        return self._call(self._stub.GetModelVersionByAlias, request, repeatable=True)

    def watch_alias(self, model: str, alias: str) -> AliasWatch:
        """Iterate the alias's current state, then every change (no polling); `close()` ends it.

        Every change comes in revision order, also to a slow consumer. Server restarts are ridden out (the
        stream is opened again, for up to `timeout` seconds without a server); the reopened stream starts from
        the current state, so changes made while it was down are skipped (ListAliasHistory has them).
        """
        request = pb.WatchAliasRequest(model=_model(model), alias=alias)
        return AliasWatch(
            lambda: self._stub.WatchAlias(request, metadata=self._metadata), self._retry, budget=self.timeout
        )

    def alias_history(self, model: str, alias: str, *, page_size: int = 0) -> Iterator[registry_pb2.AliasHistoryEntry]:
        """Every decision and change of the alias, oldest first."""
        token = ""
        while True:
            request = _convert.request(
                pb.ListAliasHistoryRequest, model=_model(model), alias=alias, page_size=page_size, page_token=token
            )
            page = self._call(self._stub.ListAliasHistory, request, repeatable=True)
            yield from page.entries
            token = page.next_page_token
            if not token:
                return
