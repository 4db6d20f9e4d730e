import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Device(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_UNSPECIFIED: _ClassVar[Device]
    DEVICE_CPU: _ClassVar[Device]
    DEVICE_CUDA: _ClassVar[Device]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FLOAT32: _ClassVar[Precision]
    PRECISION_BFLOAT16: _ClassVar[Precision]
    PRECISION_FLOAT16: _ClassVar[Precision]

class ServingEngine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_ENGINE_UNSPECIFIED: _ClassVar[ServingEngine]
    SERVING_ENGINE_VLLM: _ClassVar[ServingEngine]
    SERVING_ENGINE_PEFT: _ClassVar[ServingEngine]
DEVICE_UNSPECIFIED: Device
DEVICE_CPU: Device
DEVICE_CUDA: Device
PRECISION_UNSPECIFIED: Precision
PRECISION_FLOAT32: Precision
PRECISION_BFLOAT16: Precision
PRECISION_FLOAT16: Precision
SERVING_ENGINE_UNSPECIFIED: ServingEngine
SERVING_ENGINE_VLLM: ServingEngine
SERVING_ENGINE_PEFT: ServingEngine

class DatasetSource(_message.Message):
    __slots__ = ("builtin", "inline_jsonl", "path", "split", "inline_jsonl_sha256", "inline_jsonl_size_bytes")
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    INLINE_JSONL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    INLINE_JSONL_SHA256_FIELD_NUMBER: _ClassVar[int]
    INLINE_JSONL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    builtin: str
    inline_jsonl: bytes
    path: str
    split: str
    inline_jsonl_sha256: str
    inline_jsonl_size_bytes: int
    def __init__(self, builtin: _Optional[str] = ..., inline_jsonl: _Optional[bytes] = ..., path: _Optional[str] = ..., split: _Optional[str] = ..., inline_jsonl_sha256: _Optional[str] = ..., inline_jsonl_size_bytes: _Optional[int] = ...) -> None: ...

class LoraShape(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules", "dropout")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dropout: float
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., dropout: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "fraction", "eta", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    fraction: float
    eta: _duration_pb2.Duration
    message: str
    def __init__(self, phase: _Optional[str] = ..., fraction: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("value", "unit", "basis")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    value: float
    unit: str
    basis: str
    def __init__(self, value: _Optional[float] = ..., unit: _Optional[str] = ..., basis: _Optional[str] = ...) -> None: ...
