"""The baseline: one grpcio process, one inference thread, no batching — how OpenTau's server works.

    python -m benchmarks.direct_server --checkpoint checkpoints/demo --port 50071

It uses this project's decode and policy code, so the comparison isolates the
serving architecture, not the model or the JPEG decoder. Only benchmarks use it.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures

import grpc
import torch

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.checkpoint import open_checkpoint
from serve_app.errors import RequestError
from serve_app.observation import ObservationBatch, parse_observation
from serve_app.policies import load_policy
from serve_app.responses import ChunkResult, ReplicaIdentity, chunk_response


class DirectServicer(pb_grpc.RobotPolicyServiceServicer):
    def __init__(self, checkpoint: str):
        ckpt = open_checkpoint(checkpoint)
        self.policy = load_policy(ckpt, "cpu")
        self.policy_type = ckpt.policy_type
        self.who = ReplicaIdentity(checkpoint_id=ckpt.checkpoint_id(), replica_id="direct")
        self.infer_lock = threading.Lock()  # OpenTau: a single-thread inference executor

    def _answer(self, request, context):
        try:
            observation = parse_observation(request, self.policy.spec)
        except RequestError as err:
            context.abort(err.code, err.message)
        with self.infer_lock:
            started = time.perf_counter()
            actions = self.policy.predict(ObservationBatch.stack([observation]))
            ms = (time.perf_counter() - started) * 1e3
        return chunk_response(request.request_id, ChunkResult(actions[0], ms, 0.0, 1), self.who)

    def GetActionChunk(self, request, context):
        return self._answer(request, context)

    def StreamActionChunks(self, request_iterator, context):
        for request in request_iterator:
            yield self._answer(request, context)

    def HealthCheck(self, request, context):
        spec = self.policy.spec
        return pb.HealthCheckResponse(
            healthy=True, status="SERVING", model_name=self.policy_type, device="cpu", warmed_up=True,
            num_cameras=spec.num_cameras, chunk_length=spec.chunk_length, checkpoint_id=self.who.checkpoint_id,
        )


def serve(checkpoint: str, port: int, max_workers: int, torch_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[("grpc.max_send_message_length", 100 << 20), ("grpc.max_receive_message_length", 100 << 20)],
    )
    pb_grpc.add_RobotPolicyServiceServicer_to_server(DirectServicer(checkpoint), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, default=50071)
    # OpenTau defaults to 4 workers, which would leave streams beyond the 4th
    # waiting forever; give the baseline enough threads for every robot.
    parser.add_argument("--max_workers", type=int, default=64)
    parser.add_argument("--torch_threads", type=int, default=1)
    args = parser.parse_args()
    serve(args.checkpoint, args.port, args.max_workers, args.torch_threads)


if __name__ == "__main__":
    main()
