"""RegistryService over gRPC (asyncio): requests become use-case calls on a worker pool; watches stay on the loop."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from runledger.v1 import registry_pb2, registry_service_pb2 as pb, registry_service_pb2_grpc
from runledger_server.bounded_cache import BoundedCache
from runledger_server.domain import names
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.gates import Action, Decision
from runledger_server.services.alias_watch import AliasWatchHub
from runledger_server.services.registry import RegistryService
from runledger_server.store.registry_entities import (
    Alias,
    AliasHistoryEntry,
    Gate,
    GateResult,
    ModelVersion,
    RegisteredModel,
    ServingTarget,
)
from runledger_server.transport import convert
from runledger_server.transport.errors import handle_errors

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
ACTOR_KEY = "x-runledger-actor"
ANONYMOUS = "anonymous"
MAX_ACTOR = 256
SERVED_CACHE_SIZE = 4096  # aliases whose last response is kept; beyond that the cache starts over
SERVED_CACHE_BYTES = 16 << 20  # ... and beyond this many bytes of messages (a version's config may be megabytes)


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling. Today the caller names itself in metadata; authentication will replace this one place."""
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_KEY and isinstance(value, str) and value.strip():
            return value.strip()[:MAX_ACTOR]
    return ANONYMOUS


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self, service: RegistryService, watch_hub: AliasWatchHub, executor: Executor) -> None:
        self._svc = service
        self._hub = watch_hub
        self._executor = executor
        self._inline_serving = service.serving_reads_are_local
        # The last response per alias, with the answer it was built from: the store hands back the same answer
        # object while the alias is unchanged, so the message is reused instead of built again.
        self._served: BoundedCache[tuple[str, str], tuple[ServingTarget, pb.GetModelVersionByAliasResponse]] = (
            BoundedCache(SERVED_CACHE_SIZE, SERVED_CACHE_BYTES)
        )
        self._served_versions: BoundedCache[str, tuple[ModelVersion, registry_pb2.ModelVersion]] = BoundedCache(
            SERVED_CACHE_SIZE, SERVED_CACHE_BYTES
        )

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # ---- models ------------------------------------------------------------------------------
    @handle_errors
    async def CreateRegisteredModel(
        self, request: pb.CreateRegisteredModelRequest, context: Any
    ) -> registry_pb2.RegisteredModel:
        m = await self._call(self._svc.create_model, request.model_id, request.description, dict(request.tags))
        return model_to_proto(m)

    @handle_errors
    async def GetRegisteredModel(
        self, request: pb.GetRegisteredModelRequest, context: Any
    ) -> registry_pb2.RegisteredModel:
        return model_to_proto(await self._call(self._svc.get_model, request.name))

    @handle_errors
    async def ListRegisteredModels(
        self, request: pb.ListRegisteredModelsRequest, context: Any
    ) -> pb.ListRegisteredModelsResponse:
        page = await self._call(self._svc.list_models, request.page_size, request.page_token)
        return pb.ListRegisteredModelsResponse(
            registered_models=[model_to_proto(m) for m in page.items], next_page_token=page.next_page_token
        )

    # ---- versions ----------------------------------------------------------------------------
    @handle_errors
    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: Any
    ) -> registry_pb2.ModelVersion:
        v = await self._call(
            self._svc.create_version, request.model, request.run_id, request.artifact_path, request.description
        )
        return version_to_proto(v)

    @handle_errors
    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: Any) -> registry_pb2.ModelVersion:
        if self._inline_serving and "@" in request.name:
            # `model@alias` is the serving lookup by another name (the Python client's `resolve`): same path.
            version = self._svc.get_version(request.name)
            last = self._served_versions.get(request.name)
            if last is not None and last[0] is version:
                return last[1]
            message = version_to_proto(version)
            self._served_versions.put(request.name, (version, message), message.ByteSize())
            return message
        return version_to_proto(await self._call(self._svc.get_version, request.name))

    @handle_errors
    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Any
    ) -> pb.ListModelVersionsResponse:
        page = await self._call(self._svc.list_versions, request.model, request.page_size, request.page_token)
        return pb.ListModelVersionsResponse(
            model_versions=[version_to_proto(v) for v in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def VerifyLineage(self, request: pb.VerifyLineageRequest, context: Any) -> pb.VerifyLineageResponse:
        if not request.HasField("lineage"):  # absent, not empty: an empty one is a claim with every field missing
            raise InvalidArgument("lineage is required: the lineage of the claimed reproduction", field="lineage")
        match, expected, actual, drifted = await self._call(
            self._svc.verify_lineage, request.model, request.version, convert.lineage_from_proto(request.lineage)
        )
        return pb.VerifyLineageResponse(
            match=match, expected_fingerprint=expected, actual_fingerprint=actual, drifted_fields=drifted
        )

    # ---- gates -------------------------------------------------------------------------------
    @handle_errors
    async def CreateGate(self, request: pb.CreateGateRequest, context: Any) -> registry_pb2.Gate:
        gate = await self._call(
            self._svc.create_gate,
            request.model,
            request.gate_id,
            request.suite_fingerprint,
            request.metric,
            convert.direction_from_proto(request.direction),
            request.threshold,
        )
        return gate_to_proto(gate)

    @handle_errors
    async def GetGate(self, request: pb.GetGateRequest, context: Any) -> registry_pb2.Gate:
        return gate_to_proto(await self._call(self._svc.get_gate, request.name))

    @handle_errors
    async def RecordGateResult(self, request: pb.RecordGateResultRequest, context: Any) -> registry_pb2.GateResult:
        result = await self._call(
            self._svc.record_gate_result,
            request.model,
            request.gate_id,
            request.version,
            request.score,
            actor_of(context),
        )
        return gate_result_to_proto(result)

    # ---- aliases -----------------------------------------------------------------------------
    @handle_errors
    async def SetAlias(self, request: pb.SetAliasRequest, context: Any) -> pb.SetAliasResponse:
        outcome = await self._call(
            self._svc.set_alias,
            request.model,
            request.alias,
            request.version,
            request.gate_id,
            request.expected_revision if request.HasField("expected_revision") else None,
            actor_of(context),
        )
        assert outcome.decision is not None
        return pb.SetAliasResponse(alias=alias_to_proto(outcome.alias), decision=decision_to_proto(outcome.decision))

    @handle_errors
    async def EvaluatePromotion(
        self, request: pb.EvaluatePromotionRequest, context: Any
    ) -> pb.EvaluatePromotionResponse:
        decision = await self._call(
            self._svc.evaluate_promotion,
            request.model,
            request.alias,
            request.version,
            request.gate_id,
            request.expected_revision if request.HasField("expected_revision") else None,
        )
        return pb.EvaluatePromotionResponse(decision=decision_to_proto(decision))

    @handle_errors
    async def RollbackAlias(self, request: pb.RollbackAliasRequest, context: Any) -> pb.RollbackAliasResponse:
        expected = request.expected_revision if request.HasField("expected_revision") else None
        outcome = await self._call(self._svc.rollback_alias, request.model, request.alias, actor_of(context), expected)
        return pb.RollbackAliasResponse(alias=alias_to_proto(outcome.alias))

    @handle_errors
    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Any) -> empty_pb2.Empty:
        await self._call(
            self._svc.delete_alias,
            request.model,
            request.alias,
            request.expected_revision if request.HasField("expected_revision") else None,
            actor_of(context),
        )
        return empty_pb2.Empty()

    @handle_errors
    async def ListAliasHistory(self, request: pb.ListAliasHistoryRequest, context: Any) -> pb.ListAliasHistoryResponse:
        page = await self._call(
            self._svc.alias_history, request.model, request.alias, request.page_size, request.page_token
        )
        return pb.ListAliasHistoryResponse(
            entries=[history_entry_to_proto(e) for e in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def GetModelVersionByAlias(
        self, request: pb.GetModelVersionByAliasRequest, context: Any
    ) -> pb.GetModelVersionByAliasResponse:
        if self._inline_serving:
            # A local read of a few tens of microseconds: cheaper than two thread hand-offs, which under a
            # busy GIL (trainers streaming) each cost up to a switch interval.
            target = self._svc.serving_target(request.model, request.alias)
        else:
            target = await self._call(self._svc.serving_target, request.model, request.alias)
        key = (request.model, request.alias)
        last = self._served.get(key)
        if last is not None and last[0] is target:
            return last[1]
        assert target.version is not None
        response = pb.GetModelVersionByAliasResponse(
            model_version=version_to_proto(target.version), alias=alias_to_proto(target.alias)
        )
        self._served.put(key, (target, response), response.ByteSize())
        return response

    @handle_errors
    async def WatchAlias(self, request: pb.WatchAliasRequest, context: Any) -> AsyncIterator[pb.WatchAliasResponse]:
        """The current state first, then one message per change, in order (a wake-up that finds several changes
        sends each from the history); the stream waits on the loop, not a thread."""
        model_id = names.model_id(request.model)
        alias = names.slug(request.alias, "alias")
        async with self._hub.subscribe(model_id, alias) as sub:
            while True:
                sub.dirty.clear()  # before the read: a change committed during it wakes us again
                for target in await self._call(self._svc.watch_changes, model_id, alias, sub.seen):
                    if target.alias.revision != sub.seen:
                        sub.seen = target.alias.revision
                        yield watch_response(target)
                await sub.dirty.wait()
                self._hub.check_serving()


def watch_response(target: ServingTarget) -> pb.WatchAliasResponse:
    msg = pb.WatchAliasResponse(alias=alias_to_proto(target.alias))
    if target.version is not None:
        msg.model_version.CopyFrom(version_to_proto(target.version))
    return msg


def model_to_proto(m: RegisteredModel) -> registry_pb2.RegisteredModel:
    return registry_pb2.RegisteredModel(
        name=f"models/{m.model_id}",
        description=m.description,
        tags=m.tags,
        latest_version=m.latest_version,
        create_time=convert.timestamp(m.create_time_us),
        update_time=convert.timestamp(m.update_time_us),
    )


def version_to_proto(v: ModelVersion) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        name=f"models/{v.model_id}/versions/{v.version}",
        version=v.version,
        run_id=v.run_id,
        artifact_path=v.artifact.path,
        artifact_sha256=v.artifact.sha256,
        artifact_size=v.artifact.size,
        artifact_uri=v.artifact.uri,
        lineage_fingerprint=v.lineage_fingerprint,
        lineage=convert.lineage_to_proto(v.lineage),
        aliases=v.aliases,
        description=v.description,
        create_time=convert.timestamp(v.create_time_us),
    )


def gate_to_proto(g: Gate) -> registry_pb2.Gate:
    return registry_pb2.Gate(
        name=f"models/{g.model_id}/gates/{g.spec.gate_id}",
        gate_id=g.spec.gate_id,
        suite_fingerprint=g.spec.suite_fingerprint,
        metric=g.spec.metric,
        direction=convert.direction_to_proto(g.spec.direction),
        threshold=g.spec.threshold,
        create_time=convert.timestamp(g.create_time_us),
    )


def gate_result_to_proto(r: GateResult) -> registry_pb2.GateResult:
    return registry_pb2.GateResult(
        name=f"models/{r.model_id}/gates/{r.gate_id}/results/{r.version}",
        gate_id=r.gate_id,
        version=r.version,
        score=r.score,
        actor=r.actor,
        create_time=convert.timestamp(r.create_time_us),
    )


def alias_to_proto(a: Alias) -> registry_pb2.Alias:
    return registry_pb2.Alias(
        name=f"models/{a.model_id}/aliases/{a.alias}",
        alias=a.alias,
        version=a.version,
        revision=a.revision,
        gate_id=a.gate_id,
        update_time=convert.timestamp(a.update_time_us) if a.update_time_us else None,
    )


def decision_to_proto(d: Decision) -> registry_pb2.PromotionDecision:
    return registry_pb2.PromotionDecision(
        promoted=d.promoted,
        reason=d.reason,
        candidate_version=d.candidate_version,
        candidate_score=d.candidate_score,
        incumbent_version=d.incumbent_version or 0,
        incumbent_score=d.incumbent_score,
        threshold=d.threshold,
        direction=convert.direction_to_proto(d.direction),
        message=d.message,
    )


_ACTIONS = {
    Action.PROMOTED: registry_pb2.ALIAS_ACTION_PROMOTED,
    Action.REFUSED: registry_pb2.ALIAS_ACTION_REFUSED,
    Action.ROLLED_BACK: registry_pb2.ALIAS_ACTION_ROLLED_BACK,
    Action.DELETED: registry_pb2.ALIAS_ACTION_DELETED,
}


def history_entry_to_proto(e: AliasHistoryEntry) -> registry_pb2.AliasHistoryEntry:
    return registry_pb2.AliasHistoryEntry(
        name=f"models/{e.model_id}/aliases/{e.alias}/history/{e.sequence}",
        sequence=e.sequence,
        action=_ACTIONS.get(e.action, registry_pb2.ALIAS_ACTION_UNSPECIFIED),
        revision=e.revision,
        from_version=e.from_version,
        to_version=e.to_version,
        gate_id=e.gate_id,
        candidate_score=e.candidate_score,
        incumbent_score=e.incumbent_score,
        reason=e.reason,
        actor=e.actor,
        create_time=convert.timestamp(e.create_time_us),
    )
