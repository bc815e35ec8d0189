"""RobotPolicyService registered on Serve's gRPC servers, with a body that does not parse kept as a value.

serve_config.yaml names `add_RobotPolicyServiceServicer_to_server` from here
instead of the generated one. The difference is only the request
deserializer: the generated one raises protobuf's DecodeError inside grpcio,
which Serve answers UNKNOWN ("Unexpected <class DecodeError>"), and in a
stream it ends the stream. Here such a body becomes an `UnreadableMessage`,
which reaches the replica like any request and is refused there, at the trust
boundary, with INVALID_ARGUMENT and a plain message (in-band in a stream, so
the robot keeps its stream).

Handlers are built from the service descriptor in policy_wire (the generated
code, never edited), so a method added to the proto is served without a
change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from policy_wire import robot_inference_pb2 as pb
from serve_app.errors import invalid

SERVICE = pb.DESCRIPTOR.services_by_name["RobotPolicyService"]
SERVICE_NAME = SERVICE.full_name  # robot_inference.RobotPolicyService


@dataclass(frozen=True)
class UnreadableMessage:
    """A request body that is not a valid message of the method's type."""

    type_name: str
    size: int
    reason: str

    def refuse(self):
        """The RequestError a replica answers with."""
        return invalid(f"request is not a valid {self.type_name} ({self.size} bytes): {self.reason}")


def refuse_unreadable(request) -> None:
    """Raise INVALID_ARGUMENT if `request` is a body that did not parse."""
    if isinstance(request, UnreadableMessage):
        raise request.refuse()


def _lenient_parser(message_class) -> Callable[[bytes], object]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return UnreadableMessage(name, len(data), str(err) or "malformed protobuf")

    return parse


_HANDLER_BY_STREAMING = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_RobotPolicyServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 - grpc's naming, named in serve_config.yaml
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = _HANDLER_BY_STREAMING[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
