from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CameraImage(_message.Message):
    __slots__ = ("image_data", "encoding", "width", "height")
    IMAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image_data: bytes
    encoding: str
    width: int
    height: int
    def __init__(self, image_data: _Optional[bytes] = ..., encoding: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class RobotState(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, state: _Optional[_Iterable[float]] = ...) -> None: ...

class ObservationRequest(_message.Message):
    __slots__ = ("images", "robot_state", "prompt", "prefix_action", "delay", "timestamp_ns", "request_id", "time_to_starvation_ms")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ROBOT_STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ACTION_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_STARVATION_MS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[CameraImage]
    robot_state: RobotState
    prompt: str
    prefix_action: _containers.RepeatedCompositeFieldContainer[ActionVector]
    delay: int
    timestamp_ns: int
    request_id: str
    time_to_starvation_ms: float
    def __init__(self, images: _Optional[_Iterable[_Union[CameraImage, _Mapping]]] = ..., robot_state: _Optional[_Union[RobotState, _Mapping]] = ..., prompt: _Optional[str] = ..., prefix_action: _Optional[_Iterable[_Union[ActionVector, _Mapping]]] = ..., delay: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., request_id: _Optional[str] = ..., time_to_starvation_ms: _Optional[float] = ...) -> None: ...

class ActionVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ActionChunkResponse(_message.Message):
    __slots__ = ("action_chunk", "timestamp_ns", "request_id", "inference_time_ms", "accel", "error_code", "error_message", "queue_time_ms", "batch_size", "checkpoint_id", "replica_id")
    ACTION_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    action_chunk: _containers.RepeatedCompositeFieldContainer[ActionVector]
    timestamp_ns: int
    request_id: str
    inference_time_ms: float
    accel: float
    error_code: int
    error_message: str
    queue_time_ms: float
    batch_size: int
    checkpoint_id: str
    replica_id: str
    def __init__(self, action_chunk: _Optional[_Iterable[_Union[ActionVector, _Mapping]]] = ..., timestamp_ns: _Optional[int] = ..., request_id: _Optional[str] = ..., inference_time_ms: _Optional[float] = ..., accel: _Optional[float] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., queue_time_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., checkpoint_id: _Optional[str] = ..., replica_id: _Optional[str] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("healthy", "status", "model_name", "device", "gpu_memory_used_gb", "gpu_memory_total_gb", "num_cameras", "image_height", "image_width", "state_dim", "action_dim", "chunk_length", "policy_type", "checkpoint_id", "replica_id", "warmed_up", "gpu_ids", "min_cameras", "max_delay", "max_prompt_bytes")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_USED_GB_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_TOTAL_GB_FIELD_NUMBER: _ClassVar[int]
    NUM_CAMERAS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POLICY_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    WARMED_UP_FIELD_NUMBER: _ClassVar[int]
    GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_CAMERAS_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    status: str
    model_name: str
    device: str
    gpu_memory_used_gb: float
    gpu_memory_total_gb: float
    num_cameras: int
    image_height: int
    image_width: int
    state_dim: int
    action_dim: int
    chunk_length: int
    policy_type: str
    checkpoint_id: str
    replica_id: str
    warmed_up: bool
    gpu_ids: _containers.RepeatedScalarFieldContainer[str]
    min_cameras: int
    max_delay: int
    max_prompt_bytes: int
    def __init__(self, healthy: bool = ..., status: _Optional[str] = ..., model_name: _Optional[str] = ..., device: _Optional[str] = ..., gpu_memory_used_gb: _Optional[float] = ..., gpu_memory_total_gb: _Optional[float] = ..., num_cameras: _Optional[int] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., state_dim: _Optional[int] = ..., action_dim: _Optional[int] = ..., chunk_length: _Optional[int] = ..., policy_type: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., warmed_up: bool = ..., gpu_ids: _Optional[_Iterable[str]] = ..., min_cameras: _Optional[int] = ..., max_delay: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ...) -> None: ...
