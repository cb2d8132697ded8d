"""The boto3 client the S3 backend uses: bounded timeouts, bounded retries, retry notices.

boto3's defaults (60 s read timeout, and five attempts in the legacy mode some
environments select) let an endpoint that accepts connections and never answers hold a
command for six minutes, silently. Here:

- connecting gives up after ``CONNECT_TIMEOUT`` s and a silent socket after
  ``READ_TIMEOUT`` s (S3 keeps slow answers alive with whitespace, so a real S3 or MinIO
  is never silent that long);
- a call whose endpoint stayed silent is tried ``SILENT_ATTEMPTS`` times in all, and
  once one call has failed that way, later calls on the same client are not retried
  after a silence: a silent endpoint fails a command in well under a minute;
- throttling, 5xx and dropped connections keep the standard retry mode with backoff
  (``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` still win where a user set them);
- every retry says so on the terminal (``notices``), naming the call and the reason.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from nexus_cli.storage.notices import notice

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 15
DEFAULT_MAX_ATTEMPTS = 5
#: attempts of one call whose endpoint accepted the connection and then said nothing
SILENT_ATTEMPTS = 2
_REASON = "nexus_retry_reason"


def max_attempts() -> int:
    """Attempts per call: ``AWS_MAX_ATTEMPTS`` where set, else ``DEFAULT_MAX_ATTEMPTS``."""
    try:
        return max(int(os.environ.get("AWS_MAX_ATTEMPTS", "")), 1)
    except ValueError:
        return DEFAULT_MAX_ATTEMPTS


class RetryWatch:
    """Hooks on a client's retry decisions: caps retries after silence, says what is retried.

    ``needs-retry`` handlers see each failure before botocore's retry policy does; this
    one stops a silent endpoint's retries (by re-raising the timeout, which is what the
    call would raise once out of attempts) and notes the reason for the notice that the
    ``request-created`` hook prints when the retry is actually sent.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.attempts = max_attempts()
        self.silent = False
        self._lock = threading.Lock()

    def install(self, client: Any) -> None:
        events = client.meta.events
        events.register_first("needs-retry.s3", self.needs_retry)
        events.register("request-created.s3", self.request_created)

    def needs_retry(
        self,
        attempts: int,
        caught_exception: BaseException | None = None,
        response: Any = None,
        request_dict: dict | None = None,
        **_: Any,
    ) -> None:
        if isinstance(caught_exception, ReadTimeoutError):
            with self._lock:
                if self.silent or attempts >= SILENT_ATTEMPTS:
                    self.silent = True
                    raise caught_exception
        reason = _reason(caught_exception, response)
        if reason and request_dict is not None:
            request_dict["context"][_REASON] = reason

    def request_created(self, request: Any, operation_name: str = "", **_: Any) -> None:
        context = getattr(request, "context", None) or {}
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            reason = context.get(_REASON, "it failed")
            limit = SILENT_ATTEMPTS if "did not answer" in reason else self.attempts
            notice(f"{operation_name} on {self.where}: {reason}; retrying ({attempt} of {limit})")


def _reason(exc: BaseException | None, response: Any) -> str | None:
    """Why a call failed, in a few words, for the retry notice."""
    if isinstance(exc, ReadTimeoutError):
        return f"the endpoint did not answer within {READ_TIMEOUT} s"
    if isinstance(exc, ConnectTimeoutError):
        return f"could not connect within {CONNECT_TIMEOUT} s"
    if isinstance(exc, EndpointConnectionError):
        return "could not connect"
    if exc is not None:
        return f"the connection failed ({type(exc).__name__})"
    if response is not None:
        http, parsed = response
        status = getattr(http, "status_code", 0)
        if status >= 400:
            code = (parsed or {}).get("Error", {}).get("Code", "")
            return f"the endpoint answered {status} {code}".rstrip()
    return None


def make_client(
    endpoint_url: str | None, region: str | None, pool_size: int, where: str
) -> tuple[Any, RetryWatch]:
    """A boto3 S3 client (path-style for custom endpoints) and its retry watch."""
    retries: dict[str, Any] = {
        "mode": os.environ.get("AWS_RETRY_MODE") or "standard",
        "total_max_attempts": max_attempts(),
    }
    config = Config(
        retries=retries,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        max_pool_connections=pool_size,
        s3={"addressing_style": "path"} if endpoint_url else {},
        user_agent_extra="nexusml",
    )
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )
    watch = RetryWatch(where)
    watch.install(client)
    return client, watch
