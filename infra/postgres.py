"""A PostgreSQL server owned by its caller (``canopy up``, the test session, a benchmark).

Prefect's server runs on SQLite by default; ``canopy up --database postgres`` and
``CANOPY_TEST_DATABASE=postgres`` run it on a real PostgreSQL instead, started from
the binaries of Debian's ``postgresql`` package (``/usr/lib/postgresql/<ver>/bin``),
or those on ``PATH`` or in ``CANOPY_POSTGRES_BIN``. Everything lives in one folder:

    <folder>/data       the cluster (``initdb`` once; kept, like Prefect's SQLite file)
    <folder>/password   the ``canopy`` role's password (0600, made at ``initdb``)

``postgres`` listens on ``127.0.0.1:<port>`` only (no Unix socket), with password
(SCRAM) authentication, and is started as a process-group leader logging to a file,
as every other service (``infra.process``). ``initdb`` and ``postgres`` refuse to run
as root: as root they run as the package's ``postgres`` user, which then owns the
data folder (and must be able to reach it).

``stop_postgres`` asks for a fast shutdown (SIGINT: open sessions are rolled back, a
checkpoint is written), so the next start needs no crash recovery.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from infra.errors import CanopyError
from infra.health import NotHealthyError, Process, wait_until
from infra.process import alive, stop_group

DEFAULT_PORT = 5433  # not 5432, where a system PostgreSQL usually listens
ROLE = "canopy"  # the superuser initdb creates (Prefect's migrations add pg_trgm)
DATABASE = "prefect"
# Where Debian's packages put each major version's server binaries.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
# initdb and postgres refuse root; Debian's package creates this user.
SERVER_OS_USER = "postgres"
BINARIES = ("initdb", "postgres", "pg_isready")
INSTALL_HINT = (
    "install PostgreSQL's server: `apt-get install -y postgresql` (Debian/Ubuntu, as root), "
    "or set CANOPY_POSTGRES_BIN to a folder holding initdb, postgres and pg_isready"
)


class PostgresError(CanopyError):
    """PostgreSQL is not installed, cannot be initialised, or did not start."""


@dataclass(frozen=True)
class RunAs:
    """The OS user ``initdb`` and ``postgres`` run as (``None`` fields: this process's)."""

    name: str
    uid: int | None = None
    gid: int | None = None

    @property
    def switches(self) -> bool:
        return self.uid is not None


def find_bin_dir(
    env: Mapping[str, str] | None = None,
    *,
    version: str | None = None,
    debian_root: Path = DEBIAN_ROOT,
    which: Callable[[str], str | None] = shutil.which,
) -> Path:
    """The folder holding ``initdb``, ``postgres`` and ``pg_isready``.

    In order: ``CANOPY_POSTGRES_BIN``; Debian's ``/usr/lib/postgresql/<version>/bin``
    for the cluster's own major ``version`` when given (a cluster only starts with
    the major version that made it), else the newest installed; the folder of
    ``initdb`` on ``PATH`` (Homebrew, a symlink) resolved to where its siblings are.
    """
    env = os.environ if env is None else env
    if configured := env.get("CANOPY_POSTGRES_BIN"):
        folder = Path(configured)
        if not _has_binaries(folder):
            raise PostgresError(
                f"CANOPY_POSTGRES_BIN={configured} lacks one of {', '.join(BINARIES)}"
            )
        return folder
    versions = sorted(
        (d for d in _children(debian_root) if _has_binaries(d / "bin")),
        key=lambda d: _version_key(d.name),
        reverse=True,
    )
    if version is not None:
        versions = [d for d in versions if d.name == version]
    if versions:
        return versions[0] / "bin"
    found = which("initdb")
    if found is not None:
        folder = Path(found).resolve().parent
        if _has_binaries(folder):
            return folder
    wanted = f"PostgreSQL {version} " if version else "PostgreSQL "
    raise PostgresError(f"{wanted}server binaries not found; {INSTALL_HINT}")


def _children(folder: Path) -> list[Path]:
    try:
        return [d for d in folder.iterdir() if d.is_dir()]
    except OSError:
        return []


def _has_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in BINARIES)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (-1,)


def server_user(euid: int | None = None) -> RunAs:
    """Who runs ``initdb`` and ``postgres``: this process's user, or ``postgres`` for root."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return RunAs(pwd.getpwuid(euid).pw_name)
    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError as exc:
        raise PostgresError(
            f"initdb and postgres refuse to run as root and there is no {SERVER_OS_USER!r} "
            f"user to run them as; {INSTALL_HINT} (the package creates it), or run as a "
            "regular user"
        ) from exc
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def blocked_ancestor(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first folder above ``path`` that ``uid`` (in ``gids``) may not enter, if any.

    Folders not made yet are not judged (their maker checks again once they exist).
    """
    if uid == 0:
        return None
    for folder in reversed(path.absolute().parents):
        try:
            mode = folder.stat()
        except FileNotFoundError:
            return None
        if mode.st_uid == uid:
            bit = stat.S_IXUSR
        elif mode.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            return folder
    return None


def connection_url(
    port: int,
    password: str,
    *,
    host: str = "127.0.0.1",
    role: str = ROLE,
    database: str = DATABASE,
) -> str:
    """Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL`` for the server (asyncpg driver)."""
    return (
        f"postgresql+asyncpg://{quote(role, safe='')}:{quote(password, safe='')}"
        f"@{host}:{port}/{quote(database, safe='')}"
    )


def postgres_command(bin_dir: Path, data: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """``postgres`` on ``host:port`` over TCP only, logging to stderr (the service's log)."""
    return [
        str(bin_dir / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={host}",
        "-c",
        "unix_socket_directories=",  # no socket: none in /var/run, no path-length limit
        "-c",
        "logging_collector=off",
    ]


def initdb_command(bin_dir: Path, data: Path, pwfile: Path) -> list[str]:
    """A cluster with a password-protected superuser ``canopy``, C collation, UTF-8."""
    return [
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        ROLE,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=scram-sha-256",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]


@dataclass(frozen=True)
class PostgresCluster:
    """A cluster in ``folder``: its data, its password, its URL on ``port``."""

    folder: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file() and self.password_file.is_file()

    @property
    def version(self) -> str | None:
        """The major version that made the cluster (``data/PG_VERSION``), if any."""
        try:
            return (self.data / "PG_VERSION").read_text().strip()
        except OSError:
            return None

    def url(self) -> str:
        """Prefect's connection URL (the cluster must be initialised: it holds the password)."""
        return connection_url(self.port, self.password_file.read_text().strip(), host=self.host)


def initialise(
    cluster: PostgresCluster, log: Path, *, bin_dir: Path | None = None, user: RunAs | None = None
) -> bool:
    """``initdb`` the cluster and create Prefect's database, once; True if it did.

    The cluster is made in ``data.init`` and renamed into place when complete, so a
    failed or interrupted attempt is redone, never half used. An existing ``data``
    without its password is refused, never overwritten.
    """
    if cluster.initialised:
        return False
    if cluster.data.exists():
        raise PostgresError(
            f"{cluster.data} exists but is not a cluster with its password "
            f"({cluster.password_file}); move or delete {cluster.folder} to start afresh"
        )
    bin_dir = bin_dir or find_bin_dir()
    user = user or server_user()
    folder = cluster.folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    _check_reachable(folder, user)
    staging = folder / "data.init"
    shutil.rmtree(staging, ignore_errors=True)  # a failed attempt's
    password = secrets.token_urlsafe(24)
    pwfile = folder / ".initdb-password"
    pwfile.write_text(password + "\n")
    try:
        pwfile.chmod(0o600)
        staging.mkdir(mode=0o700)
        if user.switches:
            assert user.uid is not None and user.gid is not None
            os.chown(pwfile, user.uid, user.gid)
            os.chown(staging, user.uid, user.gid)
        _run(initdb_command(bin_dir, staging, pwfile), log, user, "initdb")
        _run(
            [str(bin_dir / "postgres"), "--single", "-D", str(staging), "postgres"],
            log,
            user,
            f"CREATE DATABASE {DATABASE}",
            stdin=f"CREATE DATABASE {DATABASE};\n",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    cluster.password_file.unlink(missing_ok=True)  # a failed attempt's
    cluster.password_file.touch(mode=0o600)
    cluster.password_file.write_text(password + "\n")
    staging.rename(cluster.data)  # last: the cluster counts once it is complete
    return True


def check_startable(cluster: PostgresCluster) -> Path:
    """Check what starting ``cluster`` needs before anything starts: the server binaries
    (of the cluster's own major version), a non-root user to run them, a folder that
    user can reach. Returns the binaries' folder; raises ``PostgresError``."""
    bin_dir = find_bin_dir(version=cluster.version)
    _check_reachable(cluster.folder.absolute(), server_user())
    return bin_dir


def _check_reachable(folder: Path, user: RunAs) -> None:
    if not user.switches:
        return
    assert user.uid is not None and user.gid is not None
    gids = set(os.getgrouplist(user.name, user.gid))
    blocked = blocked_ancestor(folder / "data", user.uid, gids)
    if blocked is not None:
        raise PostgresError(
            f"PostgreSQL runs as the {user.name!r} user (it refuses root), which cannot "
            f"enter {blocked}; keep the stack's folder where {user.name!r} can reach it "
            f"(e.g. chmod o+x {blocked})"
        )


def _run(
    command: Sequence[str], log: Path, user: RunAs, what: str, *, stdin: str | None = None
) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(
            list(command),
            input=stdin.encode() if stdin is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            timeout=300,
            check=False,
            cwd="/",
            user=user.uid,
            group=user.gid,
            extra_groups=[] if user.switches else None,
        )
    if result.returncode != 0:
        raise PostgresError(f"{what} failed with code {result.returncode}; see {log}")


def _server_env() -> dict[str, str]:
    """A small environment: PostgreSQL needs no more, and root's HOME is not its own."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if tz := os.environ.get("TZ"):
        env["TZ"] = tz
    return env


def spawn_postgres(
    cluster: PostgresCluster, log: Path, *, bin_dir: Path | None = None
) -> subprocess.Popen[bytes]:
    """Initialise the cluster if needed and start ``postgres`` (a process-group leader
    logging to ``log``) without waiting for it; ``wait_ready`` waits."""
    user = server_user()
    bin_dir = bin_dir or find_bin_dir(version=cluster.version)
    initialise(cluster, log, bin_dir=bin_dir, user=user)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            postgres_command(bin_dir, cluster.data, cluster.port, cluster.host),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_server_env(),
            start_new_session=True,
            cwd="/",
            user=user.uid,
            group=user.gid,
            extra_groups=[] if user.switches else None,
        )


def wait_ready(
    cluster: PostgresCluster,
    proc: Process | None = None,
    *,
    timeout: float = 60.0,
    what: str | None = None,
) -> None:
    """Wait until the server accepts connections to Prefect's database (``pg_isready``).

    Raises ``infra.health.NotHealthyError`` after ``timeout`` or once ``proc`` exited.
    """
    isready = [
        str(find_bin_dir(version=cluster.version) / "pg_isready"),
        "-q",
        "-h",
        cluster.host,
        "-p",
        str(cluster.port),
        "-d",
        DATABASE,
        "-U",
        ROLE,
        "-t",
        "2",
    ]

    def accepts() -> bool:
        return subprocess.run(isready, env=_server_env(), check=False).returncode == 0

    what = what or f"postgres on {cluster.host}:{cluster.port}"
    wait_until(accepts, timeout, what, proc, poll=0.1)


def start_postgres(
    cluster: PostgresCluster, log: Path, *, timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """``spawn_postgres``, then ``wait_ready``; stop it with ``stop_postgres``. Raises
    ``PostgresError`` (naming the log) if it is not installed or does not start."""
    proc = spawn_postgres(cluster, log)
    try:
        wait_ready(cluster, proc, timeout=timeout)
    except NotHealthyError as exc:
        stop_postgres(proc.pid)
        raise PostgresError(f"{exc} (log: {log})") from exc
    except BaseException:
        stop_postgres(proc.pid)
        raise
    return proc


def stop_postgres(pid: int, timeout_s: float = 30.0) -> bool:
    """Fast shutdown of the server led by ``pid`` (SIGINT to the postmaster), then what
    ``stop_group`` does for anything left. False when nothing was running."""
    if not alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while _exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_group(pid, timeout_s=5.0)  # nothing left, or a shutdown that hung
    return True


def _exists(pid: int) -> bool:
    """Whether ``pid`` still exists, reaping it if it is our exited child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return alive(pid)


@contextlib.contextmanager
def running_postgres(
    cluster: PostgresCluster, log: Path, *, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``start_postgres`` for the ``with`` block, stopped when it ends."""
    proc = start_postgres(cluster, log, timeout=timeout)
    try:
        yield proc
    finally:
        stop_postgres(proc.pid)


def main() -> int:
    """``python -m infra.postgres``: where PostgreSQL's server is and who runs it, or
    why it cannot run here (exit 1). ``make test`` asks before its PostgreSQL pass."""
    try:
        bin_dir = find_bin_dir()
        user = server_user()
    except PostgresError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"PostgreSQL server in {bin_dir}, run as {user.name!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
