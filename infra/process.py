"""Background services as process groups: start one with its log, stop it with its children.

A service is started in its own session, so it leads a process group: stopping
the group also stops what it spawned (Prefect's server its workers, a runner its
flow-run subprocesses). Services started in the background ignore SIGINT, so
they are stopped with SIGTERM, then SIGKILL for any that linger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def spawn(command: Sequence[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` as a process-group leader, appending its output to ``log``.

    ``env`` is the child's whole environment (callers merge ``os.environ`` in
    themselves, so what a service sees is explicit at the call site).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )


def alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, timeout_s: float = 15.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout_s``.

    Returns False when there was nothing to stop. Works from any process (``canopy
    down`` runs in another one than ``canopy up``); a child of the caller is reaped
    so it does not linger as a zombie.
    """
    if not alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while _reap(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0  # SIGKILL cannot be ignored; this is reaping
        while _reap(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return True


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is our exited child; True while it still exists."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return alive(pid)
