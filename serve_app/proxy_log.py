"""Quiet one harmless traceback in Serve's proxy: a robot that gave up waiting during start-up.

While no replica is ready, Serve's proxy (the fallback proxy behind HAProxy,
or the standard proxy) holds each call. A robot polling HealthCheck with a
short deadline (as the README suggests) gives up; Ray 2.60's
ProxyResponseGenerator then cancels the call but never awaits its result task
(ray/serve/_private/proxy_response_generator.py, `_get_unary_result`), and
asyncio logs "Task exception was never retrieved ... RequestCancelledError"
with a traceback, once per abandoned poll. Nothing failed: the robot got
DEADLINE_EXCEEDED and retried.

serve_config.yaml names `install` in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH,
the hook Serve calls in each proxy (and each direct-ingress replica) as it
starts. It adds no HTTP middleware; it adds a logging filter that drops
exactly those records and lets every other asyncio error through.
"""

from __future__ import annotations

import logging

_MESSAGE = "Task exception was never retrieved"


class _AbandonedPollFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from ray.serve.exceptions import RequestCancelledError

        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, RequestCancelledError) and record.getMessage().startswith(_MESSAGE))


def install() -> list:
    """Serve's proxy start-up hook: returns the HTTP middlewares to add (none)."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedPollFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedPollFilter())
    return []
