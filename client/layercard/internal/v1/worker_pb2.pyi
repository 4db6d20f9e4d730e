from layercard.v1 import tuning_pb2 as _tuning_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("spec_json", "state", "total_steps", "recorded_steps")
    class RecordedStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_STEPS_FIELD_NUMBER: _ClassVar[int]
    spec_json: bytes
    state: _tuning_pb2.TuningJobState
    total_steps: int
    recorded_steps: _containers.ScalarMap[str, int]
    def __init__(self, spec_json: _Optional[bytes] = ..., state: _Optional[_Union[_tuning_pb2.TuningJobState, str]] = ..., total_steps: _Optional[int] = ..., recorded_steps: _Optional[_Mapping[str, int]] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("kind", "payload_json", "message", "time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload_json: bytes
    message: str
    time: float
    def __init__(self, kind: _Optional[str] = ..., payload_json: _Optional[bytes] = ..., message: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("job_id", "batch", "events", "step", "worker_pid")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    batch: int
    events: _containers.RepeatedCompositeFieldContainer[WorkerEvent]
    step: int
    worker_pid: int
    def __init__(self, job_id: _Optional[str] = ..., batch: _Optional[int] = ..., events: _Optional[_Iterable[_Union[WorkerEvent, _Mapping]]] = ..., step: _Optional[int] = ..., worker_pid: _Optional[int] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("state", "recorded")
    STATE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    state: _tuning_pb2.TuningJobState
    recorded: bool
    def __init__(self, state: _Optional[_Union[_tuning_pb2.TuningJobState, str]] = ..., recorded: _Optional[bool] = ...) -> None: ...

class FinishJobRequest(_message.Message):
    __slots__ = ("job_id", "outcome", "message", "error_code", "error_message", "staged_adapter_path", "adapter_metadata_json", "result_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGED_ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    outcome: _tuning_pb2.TuningJobState
    message: str
    error_code: str
    error_message: str
    staged_adapter_path: str
    adapter_metadata_json: bytes
    result_json: bytes
    def __init__(self, job_id: _Optional[str] = ..., outcome: _Optional[_Union[_tuning_pb2.TuningJobState, str]] = ..., message: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., staged_adapter_path: _Optional[str] = ..., adapter_metadata_json: _Optional[bytes] = ..., result_json: _Optional[bytes] = ...) -> None: ...

class FinishJobResponse(_message.Message):
    __slots__ = ("applied", "state", "adapter_version")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    state: _tuning_pb2.TuningJobState
    adapter_version: str
    def __init__(self, applied: _Optional[bool] = ..., state: _Optional[_Union[_tuning_pb2.TuningJobState, str]] = ..., adapter_version: _Optional[str] = ...) -> None: ...
