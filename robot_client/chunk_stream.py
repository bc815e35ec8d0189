"""One open StreamActionChunks call, used as request -> answer with a deadline per message.

A gRPC deadline on a bidirectional stream covers the whole stream, so it
cannot bound one message. Instead requests go in through a queue, a reader
thread collects answers, and `exchange` waits for the matching answer up to
its own deadline. A stream that misses a deadline, or fails, is cancelled and
never reused: the next call opens a fresh one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from policy_wire import robot_inference_pb2 as pb

logger = logging.getLogger("robot_client")
_CLOSE = object()


class StreamFailure(grpc.RpcError):
    """A stream failure that did not come from gRPC itself (deadline, server hung up)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ChunkStream:
    def __init__(self, stub, metadata=()):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.StreamActionChunks(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._failure: grpc.RpcError | None = None
        self._opened_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="chunk-stream-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._answers.put(response)
            self._answers.put(StreamFailure(grpc.StatusCode.UNAVAILABLE, "the server ended the stream"))
        except grpc.RpcError as err:
            self._answers.put(err)

    def exchange(self, request: pb.ObservationRequest, timeout_s: float) -> pb.ActionChunkResponse:
        """Send one observation; return its answer or raise grpc.RpcError (the stream is then dead)."""
        if self._failure is not None:
            raise self._failure
        self._requests.put(request)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answer = self._answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(StreamFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:.2f} s"))
                raise self._failure from None
            if isinstance(answer, grpc.RpcError):
                self._fail(answer)
                raise answer
            if answer.request_id == request.request_id:
                return answer
            # An answer to an earlier request that we stopped waiting for.
            logger.debug("stream: dropping answer to %s while waiting for %s", answer.request_id, request.request_id)

    def age_s(self) -> float:
        return time.monotonic() - self._opened_at

    def finish(self) -> None:
        """End the stream politely (no more requests; the server closes it with OK), for renewal."""
        self._requests.put(_CLOSE)

    def _fail(self, failure: grpc.RpcError) -> None:
        self._failure = failure
        self.close()

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._call.cancel()
