"""The baseline: one grpcio process, one inference thread, no batching — how OpenTau's server works.

    python -m benchmarks.direct_server --checkpoint checkpoints/demo --port 50071

It runs this project's serving engine (serve_app/engine.py: the same decode,
policy and device thread as a replica) with passes of one observation in
arrival order, behind a plain grpc.aio server, so the comparison isolates the
serving architecture (Serve's ingress, batching across robots), not the model
or the JPEG decoder. Only benchmarks use it.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import torch

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.checkpoint import open_checkpoint
from serve_app.engine import BatchSettings, Engine
from serve_app.errors import RequestError
from serve_app.policies import load_policy
from serve_app.responses import ReplicaIdentity, chunk_response, error_response

OPENTAU_LIKE = BatchSettings(max_batch_size=1, scheduling="fifo")


class DirectServicer(pb_grpc.RobotPolicyServiceServicer):
    def __init__(self, checkpoint: str):
        ckpt = open_checkpoint(checkpoint)
        self.engine = Engine(load_policy(ckpt, "cpu"), settings=OPENTAU_LIKE)
        self.engine.warm_up()
        self.policy_type = ckpt.policy_type
        self.who = ReplicaIdentity(checkpoint_id=ckpt.checkpoint_id(), replica_id="direct")

    async def GetActionChunk(self, request, context):
        try:
            result = await self.engine.submit(request, None)
        except RequestError as err:
            await context.abort(err.code, err.message)
        return chunk_response(request.request_id, result, self.who)

    async def StreamActionChunks(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield chunk_response(request.request_id, await self.engine.submit(request, None), self.who)
            except RequestError as err:
                yield error_response(request.request_id, err, self.who)

    async def HealthCheck(self, request, context):
        return pb.HealthCheckResponse(
            healthy=True, status="SERVING", model_name=self.policy_type, device="cpu", warmed_up=True,
            checkpoint_id=self.who.checkpoint_id, replica_id=self.who.replica_id, **self.engine.spec.health_fields(),
        )


async def serve(checkpoint: str, port: int, torch_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", 100 << 20), ("grpc.max_receive_message_length", 100 << 20)],
    )
    pb_grpc.add_RobotPolicyServiceServicer_to_server(DirectServicer(checkpoint), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--torch_threads", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(serve(args.checkpoint, args.port, args.torch_threads))


if __name__ == "__main__":
    main()
