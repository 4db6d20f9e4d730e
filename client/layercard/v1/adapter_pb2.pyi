import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from layercard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LiveOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIVE_OUTCOME_UNSPECIFIED: _ClassVar[LiveOutcome]
    LIVE_OUTCOME_WITHIN: _ClassVar[LiveOutcome]
    LIVE_OUTCOME_OVER: _ClassVar[LiveOutcome]
    LIVE_OUTCOME_INCONCLUSIVE: _ClassVar[LiveOutcome]

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNSPECIFIED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_DEPLOYING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_READY: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_DEGRADED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_FAILED: _ClassVar[DeploymentState]

class CheckOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECK_OUTCOME_UNSPECIFIED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_PASSED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_SKIPPED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_PENDING: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_FAILED_FORCED: _ClassVar[CheckOutcome]

class LatencySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENCY_SOURCE_UNSPECIFIED: _ClassVar[LatencySource]
    LATENCY_SOURCE_PROBE: _ClassVar[LatencySource]
    LATENCY_SOURCE_SHAPE_CALIBRATION: _ClassVar[LatencySource]
LIVE_OUTCOME_UNSPECIFIED: LiveOutcome
LIVE_OUTCOME_WITHIN: LiveOutcome
LIVE_OUTCOME_OVER: LiveOutcome
LIVE_OUTCOME_INCONCLUSIVE: LiveOutcome
DEPLOYMENT_STATE_UNSPECIFIED: DeploymentState
DEPLOYMENT_STATE_DEPLOYING: DeploymentState
DEPLOYMENT_STATE_READY: DeploymentState
DEPLOYMENT_STATE_DEGRADED: DeploymentState
DEPLOYMENT_STATE_FAILED: DeploymentState
CHECK_OUTCOME_UNSPECIFIED: CheckOutcome
CHECK_OUTCOME_PASSED: CheckOutcome
CHECK_OUTCOME_SKIPPED: CheckOutcome
CHECK_OUTCOME_PENDING: CheckOutcome
CHECK_OUTCOME_FAILED_FORCED: CheckOutcome
LATENCY_SOURCE_UNSPECIFIED: LatencySource
LATENCY_SOURCE_PROBE: LatencySource
LATENCY_SOURCE_SHAPE_CALIBRATION: LatencySource

class DeployAdapterRequest(_message.Message):
    __slots__ = ("adapter", "version", "max_overhead_fraction", "force", "validate_only", "full_latency_probe", "rollback_over_budget", "pool")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    FULL_LATENCY_PROBE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_OVER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    max_overhead_fraction: float
    force: bool
    validate_only: bool
    full_latency_probe: bool
    rollback_over_budget: bool
    pool: str
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., max_overhead_fraction: _Optional[float] = ..., force: _Optional[bool] = ..., validate_only: _Optional[bool] = ..., full_latency_probe: _Optional[bool] = ..., rollback_over_budget: _Optional[bool] = ..., pool: _Optional[str] = ...) -> None: ...

class UndeployAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class UndeployAdapterResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "base_model", "versions", "deployment", "live_verdict")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERDICT_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    versions: _containers.RepeatedCompositeFieldContainer[AdapterVersion]
    deployment: Deployment
    live_verdict: LiveVerdict
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[AdapterVersion, _Mapping]]] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ..., live_verdict: _Optional[_Union[LiveVerdict, _Mapping]] = ...) -> None: ...

class LiveVerdict(_message.Message):
    __slots__ = ("version", "outcome", "overhead_fraction", "adapter_requests", "base_requests", "budget", "detail", "judge_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BASE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    JUDGE_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    outcome: LiveOutcome
    overhead_fraction: float
    adapter_requests: int
    base_requests: int
    budget: float
    detail: str
    judge_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., outcome: _Optional[_Union[LiveOutcome, str]] = ..., overhead_fraction: _Optional[float] = ..., adapter_requests: _Optional[int] = ..., base_requests: _Optional[int] = ..., budget: _Optional[float] = ..., detail: _Optional[str] = ..., judge_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AdapterVersion(_message.Message):
    __slots__ = ("name", "version", "layers", "lora", "size_bytes", "tuning_job", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TUNING_JOB_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    lora: _common_pb2.LoraShape
    size_bytes: int
    tuning_job: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., lora: _Optional[_Union[_common_pb2.LoraShape, _Mapping]] = ..., size_bytes: _Optional[int] = ..., tuning_job: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("adapter", "version", "served_name", "state", "replicas", "latency", "update_time", "checks", "pool")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    served_name: str
    state: DeploymentState
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    latency: LatencyMeasurement
    update_time: _timestamp_pb2.Timestamp
    checks: _containers.RepeatedCompositeFieldContainer[DeployCheck]
    pool: str
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., served_name: _Optional[str] = ..., state: _Optional[_Union[DeploymentState, str]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., latency: _Optional[_Union[LatencyMeasurement, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checks: _Optional[_Iterable[_Union[DeployCheck, _Mapping]]] = ..., pool: _Optional[str] = ...) -> None: ...

class DeployCheck(_message.Message):
    __slots__ = ("name", "outcome", "detail", "replica", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    outcome: CheckOutcome
    detail: str
    replica: str
    value: float
    def __init__(self, name: _Optional[str] = ..., outcome: _Optional[_Union[CheckOutcome, str]] = ..., detail: _Optional[str] = ..., replica: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica", "healthy", "observed_adapters", "desired_loaded", "max_lora_rank", "lora_target_modules", "error", "pool")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_LOADED_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    replica: str
    healthy: bool
    observed_adapters: _containers.RepeatedScalarFieldContainer[str]
    desired_loaded: bool
    max_lora_rank: int
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    error: str
    pool: str
    def __init__(self, replica: _Optional[str] = ..., healthy: _Optional[bool] = ..., observed_adapters: _Optional[_Iterable[str]] = ..., desired_loaded: _Optional[bool] = ..., max_lora_rank: _Optional[int] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class LatencyMeasurement(_message.Message):
    __slots__ = ("replica", "base_ttft_ms", "adapter_ttft_ms", "base_inter_token_ms", "adapter_inter_token_ms", "overhead_fraction", "samples", "source", "basis")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    BASE_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    BASE_INTER_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INTER_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    replica: str
    base_ttft_ms: float
    adapter_ttft_ms: float
    base_inter_token_ms: float
    adapter_inter_token_ms: float
    overhead_fraction: float
    samples: int
    source: LatencySource
    basis: str
    def __init__(self, replica: _Optional[str] = ..., base_ttft_ms: _Optional[float] = ..., adapter_ttft_ms: _Optional[float] = ..., base_inter_token_ms: _Optional[float] = ..., adapter_inter_token_ms: _Optional[float] = ..., overhead_fraction: _Optional[float] = ..., samples: _Optional[int] = ..., source: _Optional[_Union[LatencySource, str]] = ..., basis: _Optional[str] = ...) -> None: ...
