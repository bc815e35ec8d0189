"""API-key gate: metadata `x-api-key` compared in constant time, as OpenTau does.

The key comes from an environment variable (OpenTau's INFERENCE_API_KEY) or a
file readable only by the operator; it is never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import grpc

from serve_app.errors import RequestError
from serve_app.fleet_metadata import metadata_value

METADATA_KEY = "x-api-key"
logger = logging.getLogger("ray.serve")


class ApiKeyGate:
    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @classmethod
    def from_sources(cls, env_var: str | None = "INFERENCE_API_KEY", key_file: str | None = None) -> "ApiKeyGate":
        """The key file wins over the environment; neither means no auth."""
        if key_file:
            key = Path(key_file).expanduser().read_text().strip()
            if not key:
                raise ValueError(f"API key file {key_file} is empty")
            logger.info("API key auth on (key from file %s)", key_file)
            return cls(key)
        key = os.environ.get(env_var or "", "").strip() or None
        if key:
            logger.info("API key auth on (key from env %s)", env_var)
        else:
            logger.warning("API key auth OFF: no key in %s and no api_key_file; any client may call", env_var or "(no env var)")
        return cls(key)

    def check(self, grpc_context) -> None:
        """Raise UNAUTHENTICATED unless the call carries the right x-api-key."""
        if self._key is None:
            return
        given = metadata_value(grpc_context, METADATA_KEY).encode()
        if not hmac.compare_digest(given, self._key):
            reason = "missing" if not given else "wrong"
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"{reason} API key: send metadata '{METADATA_KEY}'")
