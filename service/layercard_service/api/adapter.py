"""AdapterService: proto <-> domain conversion only."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import timestamp_pb2

from layercard.v1 import adapter_pb2, adapter_pb2_grpc, common_pb2
from layercard_service.api.paging import ProtoPage
from layercard_service.control.deployments import AdapterManager, AdapterView, DeployCheck, DeploymentView, ReplicaView
from layercard_service.control.live_latency import LiveVerdict
from layercard_service.persistence.adapter_versions import AdapterVersion
from layercard_service.persistence.deployments import LatencyMeasurement

__all__ = ["AdapterServicer", "deployment_to_proto"]

_STATES = {
    "": adapter_pb2.DEPLOYMENT_STATE_UNSPECIFIED,
    "DEPLOYING": adapter_pb2.DEPLOYMENT_STATE_DEPLOYING,
    "READY": adapter_pb2.DEPLOYMENT_STATE_READY,
    "DEGRADED": adapter_pb2.DEPLOYMENT_STATE_DEGRADED,
    "FAILED": adapter_pb2.DEPLOYMENT_STATE_FAILED,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _replica(r: ReplicaView) -> adapter_pb2.ReplicaStatus:
    return adapter_pb2.ReplicaStatus(
        replica=r.replica,
        healthy=r.healthy,
        observed_adapters=r.observed_adapters,
        desired_loaded=r.desired_loaded,
        max_lora_rank=r.max_lora_rank,
        lora_target_modules=r.target_modules,
        error=r.error,
        pool=r.pool,
    )


def _latency(m: LatencyMeasurement) -> adapter_pb2.LatencyMeasurement:
    return adapter_pb2.LatencyMeasurement(
        replica=m.replica,
        base_ttft_ms=m.base_ttft_ms,
        adapter_ttft_ms=m.adapter_ttft_ms,
        base_inter_token_ms=m.base_inter_token_ms,
        adapter_inter_token_ms=m.adapter_inter_token_ms,
        overhead_fraction=m.overhead_fraction,
        samples=m.samples,
        source=_SOURCES.get(m.source, adapter_pb2.LATENCY_SOURCE_UNSPECIFIED),
        basis=m.basis,
    )


_SOURCES = {
    "probe": adapter_pb2.LATENCY_SOURCE_PROBE,
    "calibration": adapter_pb2.LATENCY_SOURCE_SHAPE_CALIBRATION,
}
_OUTCOMES = {
    "PASSED": adapter_pb2.CHECK_OUTCOME_PASSED,
    "SKIPPED": adapter_pb2.CHECK_OUTCOME_SKIPPED,
    "PENDING": adapter_pb2.CHECK_OUTCOME_PENDING,
    "FAILED_FORCED": adapter_pb2.CHECK_OUTCOME_FAILED_FORCED,
}


def _check(c: DeployCheck) -> adapter_pb2.DeployCheck:
    message = adapter_pb2.DeployCheck(name=c.name, outcome=_OUTCOMES[c.outcome], detail=c.detail, replica=c.replica)
    if c.value is not None:
        message.value = c.value
    return message


def deployment_to_proto(d: DeploymentView) -> adapter_pb2.Deployment:
    return adapter_pb2.Deployment(
        adapter=f"adapters/{d.adapter_id}",
        version=d.version,
        served_name=d.served_name,
        state=_STATES[d.state],
        replicas=[_replica(r) for r in d.replicas],
        latency=_latency(d.latency) if d.latency else None,
        update_time=_timestamp(d.update_time),
        checks=[_check(c) for c in d.checks],
        pool=d.pool,
    )


def _size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*") if f.is_file())


def _version(v: AdapterVersion) -> adapter_pb2.AdapterVersion:
    placement = v.metadata.get("placement", {})
    layers = placement.get("layers")
    return adapter_pb2.AdapterVersion(
        name=f"adapters/{v.adapter_id}/versions/{v.version}",
        version=v.version,
        layers=layers or [],
        lora=common_pb2.LoraShape(
            rank=placement.get("rank", 0),
            alpha=placement.get("alpha", 0.0),
            target_modules=placement.get("target_modules", []),
            dropout=placement.get("dropout", 0.0),
        ),
        size_bytes=_size(v.path),
        tuning_job=f"tuningJobs/{v.job_id}",
        create_time=_timestamp(v.create_time),
    )


_LIVE_OUTCOMES = {
    "within": adapter_pb2.LIVE_OUTCOME_WITHIN,
    "over": adapter_pb2.LIVE_OUTCOME_OVER,
    "inconclusive": adapter_pb2.LIVE_OUTCOME_INCONCLUSIVE,
}


def _live_verdict(v: LiveVerdict) -> adapter_pb2.LiveVerdict:
    message = adapter_pb2.LiveVerdict(
        version=v.version,
        outcome=_LIVE_OUTCOMES[v.outcome],
        adapter_requests=v.adapter_requests,
        base_requests=v.base_requests,
        budget=v.budget,
        detail=v.detail,
        judge_time=_timestamp(v.judged_at),
    )
    if v.overhead_fraction is not None:
        message.overhead_fraction = v.overhead_fraction
    return message


def adapter_to_proto(a: AdapterView) -> adapter_pb2.Adapter:
    return adapter_pb2.Adapter(
        name=f"adapters/{a.adapter_id}",
        base_model=a.base_model,
        versions=[_version(v) for v in a.versions],
        deployment=deployment_to_proto(a.deployment) if a.deployment else None,
        live_verdict=_live_verdict(a.live_verdict) if a.live_verdict else None,
    )


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    def __init__(self, adapters: AdapterManager) -> None:
        self.adapters = adapters

    async def DeployAdapter(self, request: adapter_pb2.DeployAdapterRequest, context) -> adapter_pb2.Deployment:
        budget = request.max_overhead_fraction if request.HasField("max_overhead_fraction") else None
        view = await self.adapters.deploy(
            request.adapter,
            request.version,
            budget,
            force=request.force,
            validate_only=request.validate_only,
            full_latency_probe=request.full_latency_probe,
            rollback_over_budget=request.rollback_over_budget,
            pool=request.pool,
        )
        return deployment_to_proto(view)

    async def UndeployAdapter(self, request, context) -> adapter_pb2.UndeployAdapterResponse:
        replicas = await self.adapters.undeploy(request.adapter)
        return adapter_pb2.UndeployAdapterResponse(replicas=[_replica(r) for r in replicas])

    async def ListAdapters(self, request, context) -> adapter_pb2.ListAdaptersResponse:
        page = ProtoPage(adapter_to_proto)
        views, token = await self.adapters.list(request.page_size, request.page_token, size_of=page.size_of)
        return adapter_pb2.ListAdaptersResponse(adapters=page.messages(views), next_page_token=token)
