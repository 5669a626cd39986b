"""The local stack's S3: moto's S3, served over HTTP/1.1 with connections kept alive.

``python -m moto.server`` serves moto under werkzeug's development server, which
ends every response with ``Connection: close`` (hard-coded) and starts a thread
per connection, so every boto3 request of the stack opened a new TCP connection.
On this 2-core machine a 2 KB PUT took 6-15 ms (median) that way, against 4.2 ms
for the same moto application under uvicorn, where boto3's pooled connections
are reused as they are with AWS S3 or MinIO (GET: 6.5-7.5 ms against 3.7-4.9
ms). Gateways, leaves and the close task all wait on S3 in a round's critical
path, so the local stack and the tests run this instead. It is moto's S3 all
the same, over real HTTP: only the HTTP server in front of it differs.

``python -m infra.s3_server -H 127.0.0.1 -p 5000`` runs it in the foreground (as
``canopy up`` does; ``--access-log`` logs one line per request, as benchmarks/scale.py
counts them); ``S3ServerThread`` runs it inside a test process.
"""

from __future__ import annotations

import argparse
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import uvicorn

# moto handles requests in this many threads at once (werkzeug's server: one per connection)
WSGI_THREADS = 16


def s3_app() -> Any:
    """moto's WSGI application (S3 and the ``/moto-api/`` health page) as an ASGI app."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from uvicorn.middleware import wsgi

    with warnings.catch_warnings():  # uvicorn suggests a2wsgi; its own adapter does the job
        warnings.simplefilter("ignore", DeprecationWarning)
        app = DomainDispatcherApplication(create_backend_app)
        return wsgi.WSGIMiddleware(app, workers=WSGI_THREADS)  # type: ignore[attr-defined]


def _config(host: str, port: int, access_log: bool = False) -> uvicorn.Config:
    return uvicorn.Config(
        s3_app(),
        host=host,
        port=port,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        lifespan="off",
    )


class S3ServerThread:
    """The S3 server in a daemon thread of this process (tests); ``stop`` ends it."""

    def __init__(self, host: str, port: int) -> None:
        self.server = uvicorn.Server(_config(host, port))
        self.thread = threading.Thread(target=self.server.run, name="s3-server", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the S3 server did not start (is its port taken?)")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    parser.add_argument(
        "--access-log", action="store_true", help="One line per request (for counting them)."
    )
    args = parser.parse_args(argv)
    uvicorn.Server(_config(args.host, args.port, args.access_log)).run()


if __name__ == "__main__":
    main()
