import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from layercard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeLayerCardRequest(_message.Message):
    __slots__ = ("model", "dataset", "probe_size", "lora", "compute_coupling", "compute_performance", "performance_steps", "device", "precision", "seed", "max_seq_len", "force_recompute", "performance_learning_rates")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PROBE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_COUPLING_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_PERFORMANCE_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: _common_pb2.DatasetSource
    probe_size: int
    lora: _common_pb2.LoraShape
    compute_coupling: bool
    compute_performance: bool
    performance_steps: int
    device: _common_pb2.Device
    precision: _common_pb2.Precision
    seed: int
    max_seq_len: int
    force_recompute: bool
    performance_learning_rates: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSource, _Mapping]] = ..., probe_size: _Optional[int] = ..., lora: _Optional[_Union[_common_pb2.LoraShape, _Mapping]] = ..., compute_coupling: _Optional[bool] = ..., compute_performance: _Optional[bool] = ..., performance_steps: _Optional[int] = ..., device: _Optional[_Union[_common_pb2.Device, str]] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., seed: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., force_recompute: _Optional[bool] = ..., performance_learning_rates: _Optional[_Iterable[float]] = ...) -> None: ...

class ComputeLayerCardResponse(_message.Message):
    __slots__ = ("progress", "card")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    card: LayerCard
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., card: _Optional[_Union[LayerCard, _Mapping]] = ...) -> None: ...

class GetLayerCardRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListLayerCardsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "model")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    model: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ListLayerCardsResponse(_message.Message):
    __slots__ = ("layer_cards", "next_page_token")
    LAYER_CARDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    layer_cards: _containers.RepeatedCompositeFieldContainer[LayerCard]
    next_page_token: str
    def __init__(self, layer_cards: _Optional[_Iterable[_Union[LayerCard, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class LayerCard(_message.Message):
    __slots__ = ("name", "model", "architecture", "num_layers", "num_parameters", "fingerprint", "settings", "create_time", "compute_duration", "from_store", "layers", "coupling", "training_cost", "serving_cost", "probe_loss", "probe_examples", "probe_tokens", "dataset", "performance_checkpoints", "learning_rate_pilots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DURATION_FIELD_NUMBER: _ClassVar[int]
    FROM_STORE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    COUPLING_FIELD_NUMBER: _ClassVar[int]
    TRAINING_COST_FIELD_NUMBER: _ClassVar[int]
    SERVING_COST_FIELD_NUMBER: _ClassVar[int]
    PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    PROBE_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROBE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_PILOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    architecture: str
    num_layers: int
    num_parameters: int
    fingerprint: str
    settings: ComputeLayerCardRequest
    create_time: _timestamp_pb2.Timestamp
    compute_duration: _duration_pb2.Duration
    from_store: bool
    layers: _containers.RepeatedCompositeFieldContainer[LayerStats]
    coupling: CouplingMatrix
    training_cost: TrainingCost
    serving_cost: ServingCost
    probe_loss: float
    probe_examples: int
    probe_tokens: int
    dataset: CardDataset
    performance_checkpoints: _containers.RepeatedScalarFieldContainer[int]
    learning_rate_pilots: _containers.RepeatedCompositeFieldContainer[LearningRatePilot]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_parameters: _Optional[int] = ..., fingerprint: _Optional[str] = ..., settings: _Optional[_Union[ComputeLayerCardRequest, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., compute_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., from_store: _Optional[bool] = ..., layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., coupling: _Optional[_Union[CouplingMatrix, _Mapping]] = ..., training_cost: _Optional[_Union[TrainingCost, _Mapping]] = ..., serving_cost: _Optional[_Union[ServingCost, _Mapping]] = ..., probe_loss: _Optional[float] = ..., probe_examples: _Optional[int] = ..., probe_tokens: _Optional[int] = ..., dataset: _Optional[_Union[CardDataset, _Mapping]] = ..., performance_checkpoints: _Optional[_Iterable[int]] = ..., learning_rate_pilots: _Optional[_Iterable[_Union[LearningRatePilot, _Mapping]]] = ...) -> None: ...

class LearningRatePilot(_message.Message):
    __slots__ = ("learning_rate", "gain_curve")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GAIN_CURVE_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    gain_curve: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, learning_rate: _Optional[float] = ..., gain_curve: _Optional[_Iterable[float]] = ...) -> None: ...

class CardDataset(_message.Message):
    __slots__ = ("source", "split", "fingerprint", "examples_used", "examples_total")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_USED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    source: str
    split: str
    fingerprint: str
    examples_used: int
    examples_total: int
    def __init__(self, source: _Optional[str] = ..., split: _Optional[str] = ..., fingerprint: _Optional[str] = ..., examples_used: _Optional[int] = ..., examples_total: _Optional[int] = ...) -> None: ...

class ModuleStats(_message.Message):
    __slots__ = ("module_type", "resnorm_sq", "resnorm_sq_split_half", "activation_energy", "effective_rank", "condition_number", "adapter_parameters")
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESNORM_SQ_FIELD_NUMBER: _ClassVar[int]
    RESNORM_SQ_SPLIT_HALF_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_ENERGY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    CONDITION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    module_type: str
    resnorm_sq: float
    resnorm_sq_split_half: float
    activation_energy: float
    effective_rank: float
    condition_number: float
    adapter_parameters: int
    def __init__(self, module_type: _Optional[str] = ..., resnorm_sq: _Optional[float] = ..., resnorm_sq_split_half: _Optional[float] = ..., activation_energy: _Optional[float] = ..., effective_rank: _Optional[float] = ..., condition_number: _Optional[float] = ..., adapter_parameters: _Optional[int] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("index", "resnorm_sq", "resnorm_sq_split_half", "resnorm_share", "predicted_gain", "activation_energy", "effective_rank", "condition_number", "modules", "forward_seconds", "backward_seconds", "activation_bytes", "adapter_parameters", "adapter_bytes", "peft_serving_overhead_ms_per_token", "measured_gain", "residual_mean_square", "pass_through_seconds", "no_graph_seconds", "pass_through_activation_bytes", "measured_gain_curve")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESNORM_SQ_FIELD_NUMBER: _ClassVar[int]
    RESNORM_SQ_SPLIT_HALF_FIELD_NUMBER: _ClassVar[int]
    RESNORM_SHARE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_ENERGY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    CONDITION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEFT_SERVING_OVERHEAD_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MEASURED_GAIN_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_MEAN_SQUARE_FIELD_NUMBER: _ClassVar[int]
    PASS_THROUGH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NO_GRAPH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PASS_THROUGH_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_GAIN_CURVE_FIELD_NUMBER: _ClassVar[int]
    index: int
    resnorm_sq: float
    resnorm_sq_split_half: float
    resnorm_share: float
    predicted_gain: float
    activation_energy: float
    effective_rank: float
    condition_number: float
    modules: _containers.RepeatedCompositeFieldContainer[ModuleStats]
    forward_seconds: float
    backward_seconds: float
    activation_bytes: int
    adapter_parameters: int
    adapter_bytes: int
    peft_serving_overhead_ms_per_token: float
    measured_gain: float
    residual_mean_square: float
    pass_through_seconds: float
    no_graph_seconds: float
    pass_through_activation_bytes: int
    measured_gain_curve: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., resnorm_sq: _Optional[float] = ..., resnorm_sq_split_half: _Optional[float] = ..., resnorm_share: _Optional[float] = ..., predicted_gain: _Optional[float] = ..., activation_energy: _Optional[float] = ..., effective_rank: _Optional[float] = ..., condition_number: _Optional[float] = ..., modules: _Optional[_Iterable[_Union[ModuleStats, _Mapping]]] = ..., forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., activation_bytes: _Optional[int] = ..., adapter_parameters: _Optional[int] = ..., adapter_bytes: _Optional[int] = ..., peft_serving_overhead_ms_per_token: _Optional[float] = ..., measured_gain: _Optional[float] = ..., residual_mean_square: _Optional[float] = ..., pass_through_seconds: _Optional[float] = ..., no_graph_seconds: _Optional[float] = ..., pass_through_activation_bytes: _Optional[int] = ..., measured_gain_curve: _Optional[_Iterable[float]] = ...) -> None: ...

class CouplingMatrix(_message.Message):
    __slots__ = ("size", "values")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    size: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, size: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class TrainingCost(_message.Message):
    __slots__ = ("fixed_seconds", "per_adapter_seconds", "base_memory_bytes", "predicted_full_step_seconds", "measured_full_step_seconds", "predicted_partial_step_seconds", "measured_partial_step_seconds", "validation_layers", "step_time_relative_error", "predicted_full_peak_memory_bytes", "measured_full_peak_memory_bytes", "peak_memory_relative_error", "batch_size", "seq_len", "calibration", "prefix_cache_bytes_per_token")
    FIXED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PER_ADAPTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BASE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FULL_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FULL_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PARTIAL_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PARTIAL_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FULL_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FULL_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    fixed_seconds: float
    per_adapter_seconds: float
    base_memory_bytes: int
    predicted_full_step_seconds: float
    measured_full_step_seconds: float
    predicted_partial_step_seconds: float
    measured_partial_step_seconds: float
    validation_layers: _containers.RepeatedScalarFieldContainer[int]
    step_time_relative_error: float
    predicted_full_peak_memory_bytes: int
    measured_full_peak_memory_bytes: int
    peak_memory_relative_error: float
    batch_size: int
    seq_len: int
    calibration: CostCalibration
    prefix_cache_bytes_per_token: int
    def __init__(self, fixed_seconds: _Optional[float] = ..., per_adapter_seconds: _Optional[float] = ..., base_memory_bytes: _Optional[int] = ..., predicted_full_step_seconds: _Optional[float] = ..., measured_full_step_seconds: _Optional[float] = ..., predicted_partial_step_seconds: _Optional[float] = ..., measured_partial_step_seconds: _Optional[float] = ..., validation_layers: _Optional[_Iterable[int]] = ..., step_time_relative_error: _Optional[float] = ..., predicted_full_peak_memory_bytes: _Optional[int] = ..., measured_full_peak_memory_bytes: _Optional[int] = ..., peak_memory_relative_error: _Optional[float] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., calibration: _Optional[_Union[CostCalibration, _Mapping]] = ..., prefix_cache_bytes_per_token: _Optional[int] = ...) -> None: ...

class CostCalibration(_message.Message):
    __slots__ = ("method", "rounds", "measured_steps", "duration", "graph_seconds_per_block", "adapter_seconds_per_block", "fit_placements", "held_out_placements", "step_error_p50", "step_error_p90", "memory_error_p50", "memory_error_p90", "notes")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SECONDS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SECONDS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    FIT_PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_ERROR_P50_FIELD_NUMBER: _ClassVar[int]
    STEP_ERROR_P90_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ERROR_P50_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ERROR_P90_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    method: str
    rounds: int
    measured_steps: int
    duration: _duration_pb2.Duration
    graph_seconds_per_block: float
    adapter_seconds_per_block: float
    fit_placements: _containers.RepeatedCompositeFieldContainer[PlacementTiming]
    held_out_placements: _containers.RepeatedCompositeFieldContainer[PlacementTiming]
    step_error_p50: float
    step_error_p90: float
    memory_error_p50: float
    memory_error_p90: float
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, method: _Optional[str] = ..., rounds: _Optional[int] = ..., measured_steps: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., graph_seconds_per_block: _Optional[float] = ..., adapter_seconds_per_block: _Optional[float] = ..., fit_placements: _Optional[_Iterable[_Union[PlacementTiming, _Mapping]]] = ..., held_out_placements: _Optional[_Iterable[_Union[PlacementTiming, _Mapping]]] = ..., step_error_p50: _Optional[float] = ..., step_error_p90: _Optional[float] = ..., memory_error_p50: _Optional[float] = ..., memory_error_p90: _Optional[float] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class PlacementTiming(_message.Message):
    __slots__ = ("layers", "measured_step_seconds", "predicted_step_seconds", "measured_peak_memory_bytes", "predicted_peak_memory_bytes")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    measured_step_seconds: float
    predicted_step_seconds: float
    measured_peak_memory_bytes: int
    predicted_peak_memory_bytes: int
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., measured_step_seconds: _Optional[float] = ..., predicted_step_seconds: _Optional[float] = ..., measured_peak_memory_bytes: _Optional[int] = ..., predicted_peak_memory_bytes: _Optional[int] = ...) -> None: ...

class ServingCost(_message.Message):
    __slots__ = ("peft_base_ms_per_token", "vllm_overhead_fraction", "vllm_basis", "vllm_base_ms_per_token", "vllm_pools")
    PEFT_BASE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VLLM_OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    VLLM_BASIS_FIELD_NUMBER: _ClassVar[int]
    VLLM_BASE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VLLM_POOLS_FIELD_NUMBER: _ClassVar[int]
    peft_base_ms_per_token: float
    vllm_overhead_fraction: float
    vllm_basis: str
    vllm_base_ms_per_token: float
    vllm_pools: _containers.RepeatedCompositeFieldContainer[VllmPoolCost]
    def __init__(self, peft_base_ms_per_token: _Optional[float] = ..., vllm_overhead_fraction: _Optional[float] = ..., vllm_basis: _Optional[str] = ..., vllm_base_ms_per_token: _Optional[float] = ..., vllm_pools: _Optional[_Iterable[_Union[VllmPoolCost, _Mapping]]] = ...) -> None: ...

class VllmPoolCost(_message.Message):
    __slots__ = ("pool", "lora_target_modules", "max_lora_rank", "ranks")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_lora_rank: int
    ranks: _containers.RepeatedCompositeFieldContainer[VllmRankCost]
    def __init__(self, pool: _Optional[str] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., max_lora_rank: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[VllmRankCost, _Mapping]]] = ...) -> None: ...

class VllmRankCost(_message.Message):
    __slots__ = ("rank", "overhead_fraction", "samples", "basis", "base_ms_per_token")
    RANK_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    BASE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rank: int
    overhead_fraction: float
    samples: int
    basis: str
    base_ms_per_token: float
    def __init__(self, rank: _Optional[int] = ..., overhead_fraction: _Optional[float] = ..., samples: _Optional[int] = ..., basis: _Optional[str] = ..., base_ms_per_token: _Optional[float] = ...) -> None: ...
