"""Errors that become a gRPC status a user can act on."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """Something the client sent is unusable; answered with `code` and `message`.

    The message is what the robot operator reads, so it names the part of the
    request at fault ("camera 1: ...", "robot_state: ...") and never contains
    a traceback.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):
        # Ray ships exceptions between processes; rebuild with both arguments.
        return (type(self), (self.code, self.message))


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
