"""A real PostgreSQL server for the tests, from Debian's `postgresql` package (`.ci/run` installs it): the
database `ray_cluster.yaml` sets up on the head for MLflow and Optuna.

The server runs in a fresh folder under /tmp, on 127.0.0.1 at a free port, with trust authentication for the
test's own connections, in its own process group. As root it runs as the `postgres` user (PostgreSQL refuses to
run as root); otherwise as the user running the tests.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sweep_checks import free_port

INSTALL = "install Debian's postgresql package (`apt-get install postgresql`; .ci/run does)"


def postgres_bindir() -> Path:
    """The folder of initdb, postgres and pg_ctl: Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(done.stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for folder in candidates:
        if folder and all((Path(folder) / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
            return Path(folder)
    pytest.fail(f"PostgreSQL's server programs (initdb, postgres, pg_ctl) were not found: {INSTALL}", pytrace=False)


class PostgresServer:
    """initdb into a fresh folder, then `postgres` on 127.0.0.1:<free port> with its socket in that folder. `log`
    is the server's log (its stderr). stop() shuts it down fast and fails if a process of it is left."""

    def __init__(self, databases: tuple[str, ...] = ("mlflow", "optuna")) -> None:
        self.bindir = postgres_bindir()
        self.databases = databases
        self.base = Path(tempfile.mkdtemp(prefix="cdl-pg-", dir="/tmp"))  # pytest's tmp is 0700 root: no use to postgres
        self.data, self.socket, self.log = self.base / "data", self.base / "socket", self.base / "postgres.log"
        self.port = free_port()
        self.superuser = "postgres"
        self.process: subprocess.Popen | None = None
        # PostgreSQL refuses to run as root: as root, everything runs as the `postgres` user Debian's package made
        self.as_user: dict = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(f"running as root, but there is no `postgres` user to run the server as: {INSTALL}", pytrace=False)
            self.as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(self.base, account.pw_uid, account.pw_gid)

    def url(self, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        done = subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=120, **self.as_user)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    def start(self, timeout: float = 60) -> None:
        import psycopg2  # the `cluster` extra (pip install -e '.[cluster]'; `make setup` installs it with the tests)

        self.socket.mkdir()
        if self.as_user:
            os.chown(self.socket, self.as_user["user"], self.as_user["group"])
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.superuser, "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        self.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.socket), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
             "-c", "max_connections=200", "-c", "log_lock_waits=on"],  # throwaway data: no durability
            cwd=self.base, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **self.as_user,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"postgres exited:\n{self.log.read_text()[-3000:]}"
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname="postgres")
                break
            except psycopg2.OperationalError:
                assert time.monotonic() < deadline, f"postgres did not accept connections:\n{self.log.read_text()[-3000:]}"
                time.sleep(0.2)
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for database in self.databases:
                    cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()

    def query(self, database: str, sql: str, *params) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname=database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster: it ends every session, waits for its processes and exits),
        SIGKILL if it hangs; then fail if any of its processes is left. Its children (background workers, one
        backend per connection) each call setsid(), so they are found as the postmaster's children, not by its
        process group."""
        if self.process is None:
            shutil.rmtree(self.base, ignore_errors=True)
            return
        children: list[int] = []
        if self.process.poll() is None:
            listed = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
            children = [int(pid) for pid in listed.split()]
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        left = [pid for pid in children if postgres_process(pid)]
        for pid in left:  # fail the test, but leave nothing behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        assert not left, f"processes of the PostgreSQL server were still running after it stopped: {left}"


def postgres_process(pid: int) -> bool:
    """Whether `pid` is (still) a PostgreSQL process, and not a zombie or another process that reused the number."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return fields.get("Name", "").strip() == "postgres" and not fields.get("State", "").startswith("Z")
