"""Added network latency, injected in the robot client's gRPC transport.

`NetworkDelay` is a client interceptor that holds every unary call for
`one_way_s` before it leaves and again after its answer arrives: a link with
that much latency each way (plain sleeping, no bandwidth model, no jitter).
`DelayedPolicyClient` is robot_client's PolicyClient on such a link.
"""

from __future__ import annotations

import time

import grpc

from robot_client.policy_client import CHANNEL_OPTIONS, PolicyClient


class NetworkDelay(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, one_way_s: float):
        self.one_way_s = one_way_s

    def intercept_unary_unary(self, continuation, client_call_details, request):
        time.sleep(self.one_way_s)  # request on its way to the server
        outcome = continuation(client_call_details, request)
        outcome.exception()  # blocks until the answer (or the failure) is back
        time.sleep(self.one_way_s)  # answer on its way back
        return outcome


class DelayedPolicyClient(PolicyClient):
    """A PolicyClient whose channel adds `delay_ms` each way (unary mode only)."""

    def __init__(self, address: str, delay_ms: float = 0.0, **kw):
        kw.setdefault("mode", "unary")  # the delay is modelled for unary calls; PolicyClient defaults to stream
        if kw["mode"] != "unary":
            raise ValueError("added delay is modelled for unary calls only")
        super().__init__(address, **kw)
        self.delay_ms = delay_ms

    def _connect(self):
        with self._lock:
            if self._stub is None and self.delay_ms > 0:
                from policy_wire import robot_inference_pb2_grpc as pb_grpc

                self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
                channel = grpc.intercept_channel(self._channel, NetworkDelay(self.delay_ms / 1e3))
                self._stub = pb_grpc.RobotPolicyServiceStub(channel)
            return super()._connect()
