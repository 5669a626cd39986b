"""Prefect on PostgreSQL: ``infra.postgres``, ``canopy up --database postgres``, the test
session's server with ``CANOPY_TEST_DATABASE=postgres``.

The pure parts run everywhere. A real PostgreSQL is started where its server is
installed; where it is not, those tests skip, unless PostgreSQL was asked for
(``CANOPY_TEST_DATABASE=postgres``, what ``make test``'s second pass sets): then
they fail with the reason. The session-server and stack tests run in that pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import stack
from flows.cli import app
from infra import postgres
from infra.postgres import (
    INSTALL_HINT,
    PostgresCluster,
    PostgresError,
    RunAs,
    blocked_ancestor,
    connection_url,
    find_bin_dir,
    initialise,
    postgres_command,
    server_user,
    start_postgres,
    stop_postgres,
)
from infra.prefect_server import prefect_server_env
from infra.process import alive
from tests.support.harness import free_port
from tests.support.postgres import requested_database

ON_POSTGRES = requested_database() == "postgres"
only_on_postgres = pytest.mark.skipif(
    not ON_POSTGRES, reason="runs in the PostgreSQL pass (CANOPY_TEST_DATABASE=postgres)"
)


def _fake_bin(folder: Path, names: tuple[str, ...] = postgres.BINARIES) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        exe = folder / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return folder


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for sock in socks:
        sock.close()
    return ports


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql`` on the database at Prefect's ``url`` (asyncpg, Prefect's own driver)."""
    import asyncpg

    async def run() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            if ";" in sql:  # several statements: no rows, no prepared statement
                await conn.execute(sql)
                return []
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


# ------------------------------------------------------------------ pure parts


def test_bin_dir_is_debians_newest_version_unless_the_cluster_needs_its_own(
    tmp_path: Path,
) -> None:
    debian = tmp_path / "lib" / "postgresql"
    for version in ("9.6", "15", "16"):
        _fake_bin(debian / version / "bin")
    _fake_bin(debian / "17" / "bin", names=("initdb",))  # a client-only leftover

    assert find_bin_dir({}, debian_root=debian, which=lambda _: None) == debian / "16" / "bin"
    assert find_bin_dir({}, version="15", debian_root=debian) == debian / "15" / "bin"
    with pytest.raises(PostgresError, match="PostgreSQL 14 server binaries not found"):
        find_bin_dir({}, version="14", debian_root=debian, which=lambda _: None)


def test_bin_dir_from_the_environment_or_path(tmp_path: Path) -> None:
    own = _fake_bin(tmp_path / "own")
    brew = _fake_bin(tmp_path / "brew" / "bin")
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "initdb").symlink_to(brew / "initdb")
    nowhere = tmp_path / "none"

    assert find_bin_dir({"CANOPY_POSTGRES_BIN": str(own)}, debian_root=nowhere) == own
    with pytest.raises(PostgresError, match=r"CANOPY_POSTGRES_BIN=.* lacks one of initdb"):
        find_bin_dir({"CANOPY_POSTGRES_BIN": str(tmp_path)}, debian_root=nowhere)
    found = find_bin_dir({}, debian_root=nowhere, which=lambda _: str(tmp_path / "path/initdb"))
    assert found == brew
    with pytest.raises(PostgresError) as missing:
        find_bin_dir({}, debian_root=nowhere, which=lambda _: None)
    assert INSTALL_HINT in str(missing.value)
    assert "apt-get install -y postgresql" in str(missing.value)


def test_connection_url_is_prefects_asyncpg_form_with_the_password_quoted() -> None:
    assert connection_url(5433, "p@ss/w:rd") == (
        "postgresql+asyncpg://canopy:p%40ss%2Fw%3Ard@127.0.0.1:5433/prefect"
    )


def test_postgres_listens_on_its_host_and_port_only_over_tcp(tmp_path: Path) -> None:
    command = postgres_command(tmp_path / "bin", tmp_path / "data", 6543)

    assert command[0] == str(tmp_path / "bin" / "postgres")
    assert command[command.index("-D") + 1] == str(tmp_path / "data")
    assert command[command.index("-p") + 1] == "6543"
    settings = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    assert "listen_addresses=127.0.0.1" in settings
    assert "unix_socket_directories=" in settings


def test_root_runs_postgres_as_the_packages_user_or_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwd

    me = server_user(euid=os.geteuid() or 1)  # any non-root uid that exists
    assert not me.switches

    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(postgres.pwd, "getpwnam", no_such_user)
    with pytest.raises(PostgresError, match="refuse to run as root and there is no 'postgres'"):
        server_user(euid=0)


def test_blocked_ancestor_is_the_first_folder_the_server_user_cannot_enter() -> None:
    base = Path(tempfile.mkdtemp(prefix="canopy-test-reach-"))  # /tmp: anyone may enter
    try:
        base.chmod(0o755)
        private = base / "private"
        (private / "stack").mkdir(parents=True)
        private.chmod(0o700)
        stranger = 54321  # neither its owner nor in its group
        data = private / "stack" / "data"

        assert blocked_ancestor(data, stranger, set()) == private
        assert blocked_ancestor(data, private.stat().st_uid, set()) is None  # its owner
        assert blocked_ancestor(data, 0, set()) is None  # root enters anything
        private.chmod(0o711)
        assert blocked_ancestor(data, stranger, set()) is None
        assert blocked_ancestor(base / "not" / "made" / "yet", stranger, set()) is None
    finally:
        shutil.rmtree(base)


def test_a_data_folder_without_its_password_is_refused_not_overwritten(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "pg")
    (cluster.data / "base").mkdir(parents=True)
    (cluster.data / "PG_VERSION").write_text("15\n")

    with pytest.raises(PostgresError, match="not a cluster with its password"):
        initialise(cluster, tmp_path / "log", bin_dir=tmp_path, user=RunAs("me"))
    assert (cluster.data / "PG_VERSION").exists()


def test_prefect_server_database_is_the_one_given_never_an_inherited_one(
    tmp_path: Path,
) -> None:
    inherited = {
        "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://someone@elsewhere/db",
        "PREFECT_SERVER_DATABASE_PASSWORD": "theirs",
        "PATH": "/usr/bin",
    }

    sqlite = prefect_server_env(tmp_path, base=inherited)
    on_postgres = prefect_server_env(
        tmp_path, base=inherited, database_url="postgresql+asyncpg://x"
    )

    assert not any("DATABASE" in name for name in sqlite)  # SQLite in its own home
    assert on_postgres["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://x"
    assert "PREFECT_SERVER_DATABASE_PASSWORD" not in on_postgres


def test_stack_checks_the_postgres_port_only_when_it_runs_on_postgres() -> None:
    prefect, s3, gateway = _free_ports(3)
    on_sqlite = stack.StackPorts(prefect, s3, (gateway,))
    on_postgres = stack.StackPorts(prefect, s3, (gateway,), postgres=prefect)

    assert "postgres" not in dict(on_sqlite.named())
    with pytest.raises(stack.StackError, match="prefect-server and postgres are both given port"):
        stack.check_ports(on_postgres)


def test_canopy_up_on_postgres_refuses_a_busy_postgres_port_before_starting_anything(
    tmp_path: Path,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        prefect, s3, gateway = _free_ports(3)
        root = tmp_path / "stack"
        args = ["up", "--root", str(root), "--database", "postgres"]
        args += ["--postgres-port", str(taken), "--prefect-port", str(prefect)]
        args += ["--s3-port", str(s3), "--gateway-ports", str(gateway)]

        result = CliRunner().invoke(app, args)

    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert f"port {taken} for postgres is already in use" in output
    assert "--postgres-port" in output
    assert not stack.record_path(root.resolve()).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server user differs only under root")
def test_canopy_up_on_postgres_refuses_a_folder_the_server_user_cannot_reach(
    tmp_path: Path,
) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    hidden.chmod(0o700)
    prefect, s3, gateway, pg = _free_ports(4)
    ports = stack.StackPorts(prefect, s3, (gateway,), postgres=pg)
    try:
        user = server_user()
    except PostgresError:
        pytest.skip("no 'postgres' user on this machine")

    # pytest's own folders are 0700 too: the first one the user cannot enter is named
    with pytest.raises(stack.StackError, match=f"{user.name!r} .*which cannot enter /"):
        stack.up(hidden / "stack", ports=ports, jobs=("hello-mobile",), log=lambda _m: None)
    assert not (hidden / "stack" / "stack.json").exists()  # nothing was started


# ------------------------------------------------------------- a real server


@pytest.fixture
def reachable_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder the server user can reach (pytest's own tmp is its owner's only)."""
    try:
        find_bin_dir()
        server_user()
    except PostgresError as exc:
        if ON_POSTGRES:
            pytest.fail(f"CANOPY_TEST_DATABASE=postgres but PostgreSQL cannot run: {exc}")
        pytest.skip(f"PostgreSQL is not installed: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="canopy-test-pg-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_initialises_once_serves_prefects_database_and_stops_cleanly(
    reachable_folder: Path,
) -> None:
    cluster = PostgresCluster(reachable_folder / "cluster", port=free_port())
    log = reachable_folder / "postgres.log"

    proc = start_postgres(cluster, log)
    try:
        url = cluster.url()
        assert _query(url, "select current_user, current_database()") == [("canopy", "prefect")]
        _query(url, "create table kept (n int); insert into kept values (42)")
    finally:
        assert stop_postgres(proc.pid) is True
    assert not alive(proc.pid)
    assert log.read_text().rstrip().endswith("database system is shut down")  # no crash

    restarted = start_postgres(cluster, log)  # the same cluster, not initialised again
    try:
        assert cluster.url() == url
        assert _query(url, "select n from kept") == [(42,)]
    finally:
        stop_postgres(restarted.pid)
    assert log.read_text().count("creating configuration files") == 1


def test_postgres_that_cannot_listen_fails_naming_its_log(reachable_folder: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cluster = PostgresCluster(reachable_folder / "c", port=int(busy.getsockname()[1]))
        log = reachable_folder / "postgres.log"

        with pytest.raises(PostgresError, match=f"postgres on .* exited .*log: {log}"):
            start_postgres(cluster, log, timeout=30)


# ------------------------------------------- the PostgreSQL pass (make test)


@only_on_postgres
def test_the_sessions_prefect_server_keeps_its_runs_in_postgres(
    prefect_postgres: PostgresCluster | None, prefect_api: str
) -> None:
    from prefect import flow

    assert prefect_postgres is not None
    name = f"pg-probe-{uuid.uuid4().hex[:8]}"

    @flow(name=name)
    def probe() -> int:
        return 7

    assert probe() == 7
    rows = _query(
        prefect_postgres.url(),
        f"select r.state_type from flow_run r join flow f on f.id = r.flow_id "
        f"where f.name = '{name}'",
    )
    assert rows == [("COMPLETED",)]


@only_on_postgres
@pytest.mark.slow
def test_canopy_up_on_postgres_serves_the_deployments_from_it_and_down_stops_it(
    reachable_folder: Path,
) -> None:
    root = reachable_folder / "stack"
    prefect, s3, gateway, pg = _free_ports(4)
    ports = stack.StackPorts(prefect, s3, (gateway,), postgres=pg)
    fleet = stack.SimulatedFleet(devices=2)

    record = stack.up(root, ports=ports, jobs=("hello-mobile",), fleet=fleet, log=print)
    try:
        names = [s.name for s in record.services]
        assert names.index("postgres") < names.index("prefect-server")
        cluster = PostgresCluster(root / "postgres", port=pg)
        deployed = _query(cluster.url(), "select name from deployment")
        assert ("hello-mobile",) in deployed  # the runner registered it in Postgres
        assert not (root / "prefect" / "prefect.db").exists()  # and not in SQLite
    finally:
        stopped = stack.down(root, log=print)
    assert stopped == len(record.services)
    assert not any(alive(s.pid) for s in record.services)
    log = (root / "logs" / "postgres.log").read_text()
    assert log.rstrip().endswith("database system is shut down")


def test_requested_database_is_sqlite_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANOPY_TEST_DATABASE", raising=False)
    assert requested_database() == "sqlite"
    monkeypatch.setenv("CANOPY_TEST_DATABASE", "Postgres")
    assert requested_database() == "postgres"
    monkeypatch.setenv("CANOPY_TEST_DATABASE", "mysql")
    with pytest.raises(ValueError, match="use one of sqlite, postgres"):
        requested_database()


def test_run_as_switches_only_with_a_uid() -> None:
    assert not RunAs("me").switches
    assert RunAs("postgres", 101, 104).switches
