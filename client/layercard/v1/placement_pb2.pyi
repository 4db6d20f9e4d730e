import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from layercard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_ACCURACY: _ClassVar[Objective]
    OBJECTIVE_EFFICIENCY: _ClassVar[Objective]
    OBJECTIVE_BALANCED: _ClassVar[Objective]
    OBJECTIVE_FIXED_K: _ClassVar[Objective]
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_ACCURACY: Objective
OBJECTIVE_EFFICIENCY: Objective
OBJECTIVE_BALANCED: Objective
OBJECTIVE_FIXED_K: Objective

class Budget(_message.Message):
    __slots__ = ("max_step_seconds", "max_step_fraction_of_full", "max_peak_memory_bytes", "max_adapter_parameters", "max_adapter_bytes", "max_layers", "max_serving_overhead_ms_per_token", "max_serving_overhead_fraction", "serving_engine", "max_training_time", "serving_concurrency")
    MAX_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FRACTION_OF_FULL_FIELD_NUMBER: _ClassVar[int]
    MAX_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVING_OVERHEAD_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVING_OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SERVING_ENGINE_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAINING_TIME_FIELD_NUMBER: _ClassVar[int]
    SERVING_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    max_step_seconds: float
    max_step_fraction_of_full: float
    max_peak_memory_bytes: int
    max_adapter_parameters: int
    max_adapter_bytes: int
    max_layers: int
    max_serving_overhead_ms_per_token: float
    max_serving_overhead_fraction: float
    serving_engine: _common_pb2.ServingEngine
    max_training_time: _duration_pb2.Duration
    serving_concurrency: int
    def __init__(self, max_step_seconds: _Optional[float] = ..., max_step_fraction_of_full: _Optional[float] = ..., max_peak_memory_bytes: _Optional[int] = ..., max_adapter_parameters: _Optional[int] = ..., max_adapter_bytes: _Optional[int] = ..., max_layers: _Optional[int] = ..., max_serving_overhead_ms_per_token: _Optional[float] = ..., max_serving_overhead_fraction: _Optional[float] = ..., serving_engine: _Optional[_Union[_common_pb2.ServingEngine, str]] = ..., max_training_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., serving_concurrency: _Optional[int] = ...) -> None: ...

class PlanPlacementRequest(_message.Message):
    __slots__ = ("layer_card", "objective", "budget", "target_gain_fraction", "k", "candidate_ranks", "candidate_module_sets", "steps", "gain_score", "prefix_cache", "train_examples", "batch_size")
    LAYER_CARD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_GAIN_FRACTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RANKS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MODULE_SETS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GAIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    layer_card: str
    objective: Objective
    budget: Budget
    target_gain_fraction: float
    k: int
    candidate_ranks: _containers.RepeatedScalarFieldContainer[int]
    candidate_module_sets: _containers.RepeatedScalarFieldContainer[str]
    steps: int
    gain_score: str
    prefix_cache: bool
    train_examples: int
    batch_size: int
    def __init__(self, layer_card: _Optional[str] = ..., objective: _Optional[_Union[Objective, str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., target_gain_fraction: _Optional[float] = ..., k: _Optional[int] = ..., candidate_ranks: _Optional[_Iterable[int]] = ..., candidate_module_sets: _Optional[_Iterable[str]] = ..., steps: _Optional[int] = ..., gain_score: _Optional[str] = ..., prefix_cache: _Optional[bool] = ..., train_examples: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("layer_card", "objective", "layers", "lora", "predicted_gain", "predicted_gain_share", "step_seconds", "step_fraction_of_full", "peak_memory_bytes", "adapter_parameters", "adapter_bytes", "serving_overhead_ms_per_token", "serving_overhead_fraction", "steps", "binding_limits", "rationale", "gain_score", "prefix_cache_build_seconds", "prefix_cache_bytes", "predicted_curve", "learning_rate", "serving_pool")
    LAYER_CARD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_GAIN_SHARE_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FRACTION_OF_FULL_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVING_OVERHEAD_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SERVING_OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BINDING_LIMITS_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    GAIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CURVE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SERVING_POOL_FIELD_NUMBER: _ClassVar[int]
    layer_card: str
    objective: Objective
    layers: _containers.RepeatedScalarFieldContainer[int]
    lora: _common_pb2.LoraShape
    predicted_gain: _common_pb2.Prediction
    predicted_gain_share: float
    step_seconds: _common_pb2.Prediction
    step_fraction_of_full: _common_pb2.Prediction
    peak_memory_bytes: _common_pb2.Prediction
    adapter_parameters: _common_pb2.Prediction
    adapter_bytes: _common_pb2.Prediction
    serving_overhead_ms_per_token: _common_pb2.Prediction
    serving_overhead_fraction: _common_pb2.Prediction
    steps: int
    binding_limits: _containers.RepeatedScalarFieldContainer[str]
    rationale: str
    gain_score: str
    prefix_cache_build_seconds: _common_pb2.Prediction
    prefix_cache_bytes: _common_pb2.Prediction
    predicted_curve: _containers.RepeatedCompositeFieldContainer[CurvePoint]
    learning_rate: float
    serving_pool: str
    def __init__(self, layer_card: _Optional[str] = ..., objective: _Optional[_Union[Objective, str]] = ..., layers: _Optional[_Iterable[int]] = ..., lora: _Optional[_Union[_common_pb2.LoraShape, _Mapping]] = ..., predicted_gain: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., predicted_gain_share: _Optional[float] = ..., step_seconds: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., step_fraction_of_full: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., peak_memory_bytes: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., adapter_parameters: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., adapter_bytes: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., serving_overhead_ms_per_token: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., serving_overhead_fraction: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., steps: _Optional[int] = ..., binding_limits: _Optional[_Iterable[str]] = ..., rationale: _Optional[str] = ..., gain_score: _Optional[str] = ..., prefix_cache_build_seconds: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., prefix_cache_bytes: _Optional[_Union[_common_pb2.Prediction, _Mapping]] = ..., predicted_curve: _Optional[_Iterable[_Union[CurvePoint, _Mapping]]] = ..., learning_rate: _Optional[float] = ..., serving_pool: _Optional[str] = ...) -> None: ...

class CurvePoint(_message.Message):
    __slots__ = ("steps", "seconds", "gain", "gain_low", "gain_high")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    GAIN_LOW_FIELD_NUMBER: _ClassVar[int]
    GAIN_HIGH_FIELD_NUMBER: _ClassVar[int]
    steps: int
    seconds: float
    gain: float
    gain_low: float
    gain_high: float
    def __init__(self, steps: _Optional[int] = ..., seconds: _Optional[float] = ..., gain: _Optional[float] = ..., gain_low: _Optional[float] = ..., gain_high: _Optional[float] = ...) -> None: ...
