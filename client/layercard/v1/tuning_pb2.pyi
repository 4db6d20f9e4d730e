import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from layercard.v1 import common_pb2 as _common_pb2
from layercard.v1 import placement_pb2 as _placement_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TuningJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUNING_JOB_STATE_UNSPECIFIED: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_QUEUED: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_RUNNING: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_CANCELLING: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_SUCCEEDED: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_FAILED: _ClassVar[TuningJobState]
    TUNING_JOB_STATE_CANCELLED: _ClassVar[TuningJobState]

class LearningRateSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNING_RATE_SCHEDULE_UNSPECIFIED: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_CONSTANT: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_LINEAR: _ClassVar[LearningRateSchedule]
    LEARNING_RATE_SCHEDULE_COSINE: _ClassVar[LearningRateSchedule]
TUNING_JOB_STATE_UNSPECIFIED: TuningJobState
TUNING_JOB_STATE_QUEUED: TuningJobState
TUNING_JOB_STATE_RUNNING: TuningJobState
TUNING_JOB_STATE_CANCELLING: TuningJobState
TUNING_JOB_STATE_SUCCEEDED: TuningJobState
TUNING_JOB_STATE_FAILED: TuningJobState
TUNING_JOB_STATE_CANCELLED: TuningJobState
LEARNING_RATE_SCHEDULE_UNSPECIFIED: LearningRateSchedule
LEARNING_RATE_SCHEDULE_CONSTANT: LearningRateSchedule
LEARNING_RATE_SCHEDULE_LINEAR: LearningRateSchedule
LEARNING_RATE_SCHEDULE_COSINE: LearningRateSchedule

class Hyperparameters(_message.Message):
    __slots__ = ("steps", "epochs", "learning_rate", "schedule", "warmup_steps", "batch_size", "lora", "seed", "eval_interval", "early_stopping_patience", "checkpoint_interval", "max_seq_len", "early_stopping_min_delta", "early_stopping_min_delta_relative", "prefix_cache")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVAL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_MIN_DELTA_RELATIVE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    epochs: float
    learning_rate: float
    schedule: LearningRateSchedule
    warmup_steps: int
    batch_size: int
    lora: _common_pb2.LoraShape
    seed: int
    eval_interval: int
    early_stopping_patience: int
    checkpoint_interval: int
    max_seq_len: int
    early_stopping_min_delta: float
    early_stopping_min_delta_relative: float
    prefix_cache: bool
    def __init__(self, steps: _Optional[int] = ..., epochs: _Optional[float] = ..., learning_rate: _Optional[float] = ..., schedule: _Optional[_Union[LearningRateSchedule, str]] = ..., warmup_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lora: _Optional[_Union[_common_pb2.LoraShape, _Mapping]] = ..., seed: _Optional[int] = ..., eval_interval: _Optional[int] = ..., early_stopping_patience: _Optional[int] = ..., checkpoint_interval: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., early_stopping_min_delta: _Optional[float] = ..., early_stopping_min_delta_relative: _Optional[float] = ..., prefix_cache: _Optional[bool] = ...) -> None: ...

class ExplicitLayers(_message.Message):
    __slots__ = ("layers", "lora")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    lora: _common_pb2.LoraShape
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., lora: _Optional[_Union[_common_pb2.LoraShape, _Mapping]] = ...) -> None: ...

class CardBudget(_message.Message):
    __slots__ = ("layer_card", "objective", "budget", "target_gain_fraction", "k")
    LAYER_CARD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_GAIN_FRACTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    layer_card: str
    objective: _placement_pb2.Objective
    budget: _placement_pb2.Budget
    target_gain_fraction: float
    k: int
    def __init__(self, layer_card: _Optional[str] = ..., objective: _Optional[_Union[_placement_pb2.Objective, str]] = ..., budget: _Optional[_Union[_placement_pb2.Budget, _Mapping]] = ..., target_gain_fraction: _Optional[float] = ..., k: _Optional[int] = ...) -> None: ...

class CreateTuningJobRequest(_message.Message):
    __slots__ = ("model", "training_data", "validation_data", "placement", "card_budget", "explicit_layers", "hyperparameters", "adapter_id", "tuning_job_id", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_DATA_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CARD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXPLICIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TUNING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    training_data: _common_pb2.DatasetSource
    validation_data: _common_pb2.DatasetSource
    placement: _placement_pb2.Placement
    card_budget: CardBudget
    explicit_layers: ExplicitLayers
    hyperparameters: Hyperparameters
    adapter_id: str
    tuning_job_id: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., training_data: _Optional[_Union[_common_pb2.DatasetSource, _Mapping]] = ..., validation_data: _Optional[_Union[_common_pb2.DatasetSource, _Mapping]] = ..., placement: _Optional[_Union[_placement_pb2.Placement, _Mapping]] = ..., card_budget: _Optional[_Union[CardBudget, _Mapping]] = ..., explicit_layers: _Optional[_Union[ExplicitLayers, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., adapter_id: _Optional[str] = ..., tuning_job_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetTuningJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTuningJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[TuningJobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[TuningJobState, str]]] = ...) -> None: ...

class ListTuningJobsResponse(_message.Message):
    __slots__ = ("tuning_jobs", "next_page_token")
    TUNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tuning_jobs: _containers.RepeatedCompositeFieldContainer[TuningJob]
    next_page_token: str
    def __init__(self, tuning_jobs: _Optional[_Iterable[_Union[TuningJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTuningJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTuningJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchTuningJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class TuningJob(_message.Message):
    __slots__ = ("name", "state", "create_time", "start_time", "end_time", "model", "training_data", "validation_data", "placement", "hyperparameters", "adapter_id", "step", "total_steps", "error_code", "error_message", "result")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_DATA_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: TuningJobState
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    model: str
    training_data: _common_pb2.DatasetSource
    validation_data: _common_pb2.DatasetSource
    placement: _placement_pb2.Placement
    hyperparameters: Hyperparameters
    adapter_id: str
    step: int
    total_steps: int
    error_code: str
    error_message: str
    result: TuningResult
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[TuningJobState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., training_data: _Optional[_Union[_common_pb2.DatasetSource, _Mapping]] = ..., validation_data: _Optional[_Union[_common_pb2.DatasetSource, _Mapping]] = ..., placement: _Optional[_Union[_placement_pb2.Placement, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., adapter_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., result: _Optional[_Union[TuningResult, _Mapping]] = ...) -> None: ...

class TuningResult(_message.Message):
    __slots__ = ("adapter_version", "final_eval", "base_eval", "measured_step_seconds", "predicted_step_seconds", "measured_peak_memory_bytes", "predicted_peak_memory_bytes", "training_duration", "tokens_per_second")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_EVAL_FIELD_NUMBER: _ClassVar[int]
    BASE_EVAL_FIELD_NUMBER: _ClassVar[int]
    MEASURED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DURATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    final_eval: EvalMetrics
    base_eval: EvalMetrics
    measured_step_seconds: float
    predicted_step_seconds: float
    measured_peak_memory_bytes: int
    predicted_peak_memory_bytes: int
    training_duration: _duration_pb2.Duration
    tokens_per_second: float
    def __init__(self, adapter_version: _Optional[str] = ..., final_eval: _Optional[_Union[EvalMetrics, _Mapping]] = ..., base_eval: _Optional[_Union[EvalMetrics, _Mapping]] = ..., measured_step_seconds: _Optional[float] = ..., predicted_step_seconds: _Optional[float] = ..., measured_peak_memory_bytes: _Optional[int] = ..., predicted_peak_memory_bytes: _Optional[int] = ..., training_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class EvalMetrics(_message.Message):
    __slots__ = ("step", "loss", "exact_match", "examples")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    exact_match: float
    examples: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., exact_match: _Optional[float] = ..., examples: _Optional[int] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step", "loss", "learning_rate", "tokens_per_second", "eta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta: _duration_pb2.Duration
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PrefixCacheReport(_message.Message):
    __slots__ = ("enabled", "reason", "cached_blocks", "examples", "tokens", "build_duration", "size_bytes", "on_disk", "saved_per_step")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUILD_DURATION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ON_DISK_FIELD_NUMBER: _ClassVar[int]
    SAVED_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reason: str
    cached_blocks: int
    examples: int
    tokens: int
    build_duration: _duration_pb2.Duration
    size_bytes: int
    on_disk: bool
    saved_per_step: _duration_pb2.Duration
    def __init__(self, enabled: _Optional[bool] = ..., reason: _Optional[str] = ..., cached_blocks: _Optional[int] = ..., examples: _Optional[int] = ..., tokens: _Optional[int] = ..., build_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., size_bytes: _Optional[int] = ..., on_disk: _Optional[bool] = ..., saved_per_step: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class TuningJobEvent(_message.Message):
    __slots__ = ("sequence", "time", "state_change", "step", "eval", "checkpoint", "prefix_cache", "message")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state_change: TuningJobState
    step: StepMetrics
    eval: EvalMetrics
    checkpoint: Checkpoint
    prefix_cache: PrefixCacheReport
    message: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_change: _Optional[_Union[TuningJobState, str]] = ..., step: _Optional[_Union[StepMetrics, _Mapping]] = ..., eval: _Optional[_Union[EvalMetrics, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., prefix_cache: _Optional[_Union[PrefixCacheReport, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...
