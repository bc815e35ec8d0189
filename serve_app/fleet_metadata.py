"""What a robot says about itself in gRPC metadata: the model it wants, and who it is.

    multiplexed_model_id   a name from args.checkpoints (none: the default model)
    robot_id               optional; labels the per-robot metrics (serve_app/metrics.py)

The model id is read through Serve (`serve.get_multiplexed_model_id()`), which carries it in both
ingress modes: Ray 2.60's direct ingress (HAProxy) copies the call's `multiplexed_model_id`
metadata into the request context (ray/serve/_private/replica.py, `_prepare_grpc_request`), and
the standard proxy passes it with the handle call. Outside Serve (the deployment class built
directly, unit tests) there is no request context, so the call's own metadata is read instead.
"""

from __future__ import annotations

MODEL_ID_KEY = "multiplexed_model_id"
ROBOT_ID_KEY = "robot_id"
MAX_ROBOT_ID_CHARS = 128


def requested_model(grpc_context) -> str:
    """The model id the call names, '' for none."""
    try:
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
    except Exception:  # noqa: BLE001 - outside a replica: no request context
        model_id = ""
    return model_id or metadata_value(grpc_context, MODEL_ID_KEY)


def robot_of(grpc_context) -> str:
    """The robot id the call names, '' for none (cut to MAX_ROBOT_ID_CHARS: it becomes a label)."""
    return metadata_value(grpc_context, ROBOT_ID_KEY)[:MAX_ROBOT_ID_CHARS]


def metadata_value(grpc_context, key: str) -> str:
    """A call's metadata value under `key` ('' if absent); also what serve_app/auth.py reads the API key with."""
    if grpc_context is None:
        return ""
    metadata = getattr(grpc_context, "invocation_metadata", None)
    for k, v in (metadata() if callable(metadata) else ()):
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return ""
