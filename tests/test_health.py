"""The one health-wait helper: passes when the check does, fails fast on a dead process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from infra.errors import CanopyError
from infra.health import NotHealthyError, wait_http_ok, wait_until


def test_wait_until_returns_once_the_check_passes() -> None:
    # Prepare: a check that fails twice, raising a transient error once
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        return len(calls) >= 3

    # Execute
    wait_until(check, timeout=5.0, what="svc", poll=0.01)

    # Assert: it polled until the third call, then stopped
    assert len(calls) == 3


def test_timeout_names_the_service_and_quotes_the_last_error() -> None:
    def check() -> bool:
        raise ConnectionRefusedError("nobody listens")

    started = time.monotonic()
    with pytest.raises(NotHealthyError) as info:
        wait_until(check, timeout=0.2, what="moto-s3 (log: x.log)", poll=0.01)

    assert time.monotonic() - started < 2.0
    message = str(info.value)
    assert "moto-s3 (log: x.log) not healthy after 0.2s" in message
    assert "ConnectionRefusedError: nobody listens" in message
    # Callers may catch it as either Canopy's base error or a plain timeout
    assert isinstance(info.value, CanopyError) and isinstance(info.value, TimeoutError)


def test_check_runs_once_even_with_a_zero_timeout() -> None:
    wait_until(lambda: True, timeout=0.0, what="svc")


def test_an_unexpected_error_is_not_swallowed() -> None:
    def check() -> bool:
        raise KeyError("bug in the check")

    with pytest.raises(KeyError):
        wait_until(check, timeout=5.0, what="svc", poll=0.01)


def test_a_process_that_exits_fails_the_wait_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait(timeout=30)

    started = time.monotonic()
    with pytest.raises(NotHealthyError, match="gateway-0 exited with code 3"):
        wait_until(lambda: False, timeout=60.0, what="gateway-0", proc=proc, poll=0.01)
    assert time.monotonic() - started < 1.0


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first two requests, then 200: a server still warming up."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200 if type(self).hits > 2 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def flaky_url() -> Iterator[str]:
    _Flaky.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


def test_wait_http_ok_waits_for_a_200(flaky_url: str) -> None:
    wait_http_ok(flaky_url, timeout=10.0, poll=0.01)

    assert _Flaky.hits == 3


def test_wait_http_ok_times_out_on_a_closed_port() -> None:
    with pytest.raises(NotHealthyError, match=r"http://127\.0\.0\.1:9/ not healthy"):
        wait_http_ok("http://127.0.0.1:9/", timeout=0.3, poll=0.05)
