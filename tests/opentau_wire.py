"""An OpenTau-era client, built in the test from the wire table alone (fields 1-7).

It knows nothing of our extensions, exactly like a robot running OpenTau's
generated stubs: its messages live in their own descriptor pool, so nothing
from policy_wire can leak into it.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
_MESSAGES = {
    "CameraImage": [("image_data", 1, F.TYPE_BYTES, None, False), ("encoding", 2, F.TYPE_STRING, None, False)],
    "RobotState": [("state", 1, F.TYPE_FLOAT, None, True)],
    "ActionVector": [("values", 1, F.TYPE_FLOAT, None, True)],
    "ObservationRequest": [
        ("images", 1, F.TYPE_MESSAGE, "CameraImage", True),
        ("robot_state", 2, F.TYPE_MESSAGE, "RobotState", False),
        ("prompt", 3, F.TYPE_STRING, None, False),
        ("prefix_action", 4, F.TYPE_MESSAGE, "ActionVector", True),
        ("delay", 5, F.TYPE_INT32, None, False),
        ("timestamp_ns", 6, F.TYPE_INT64, None, False),
        ("request_id", 7, F.TYPE_STRING, None, False),
    ],
    "ActionChunkResponse": [
        ("action_chunk", 1, F.TYPE_MESSAGE, "ActionVector", True),
        ("timestamp_ns", 2, F.TYPE_INT64, None, False),
        ("request_id", 3, F.TYPE_STRING, None, False),
        ("inference_time_ms", 4, F.TYPE_FLOAT, None, False),
    ],
    "HealthCheckRequest": [],
    "HealthCheckResponse": [
        ("healthy", 1, F.TYPE_BOOL, None, False),
        ("status", 2, F.TYPE_STRING, None, False),
        ("model_name", 3, F.TYPE_STRING, None, False),
        ("device", 4, F.TYPE_STRING, None, False),
        ("gpu_memory_used_gb", 5, F.TYPE_FLOAT, None, False),
        ("gpu_memory_total_gb", 6, F.TYPE_FLOAT, None, False),
    ],
}


def _build():
    file = descriptor_pb2.FileDescriptorProto(name="legacy/robot_inference.proto", package="robot_inference", syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, type_name, repeated in fields:
            field = message.field.add(name=field_name, number=number, type=kind)
            field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if type_name:
                field.type_name = f".robot_inference.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"robot_inference.{name}")) for name in _MESSAGES}


legacy = _build()
SERVICE = "/robot_inference.RobotPolicyService"


class LegacyStub:
    def __init__(self, channel: grpc.Channel):
        def unary(method, req, resp):
            return channel.unary_unary(
                f"{SERVICE}/{method}", request_serializer=legacy[req].SerializeToString,
                response_deserializer=legacy[resp].FromString,
            )

        self.GetActionChunk = unary("GetActionChunk", "ObservationRequest", "ActionChunkResponse")
        self.HealthCheck = unary("HealthCheck", "HealthCheckRequest", "HealthCheckResponse")
        self.StreamActionChunks = channel.stream_stream(
            f"{SERVICE}/StreamActionChunks",
            request_serializer=legacy["ObservationRequest"].SerializeToString,
            response_deserializer=legacy["ActionChunkResponse"].FromString,
        )
