"""A throwaway PostgreSQL server for the tests and benchmarks: `initdb` into a temporary folder,
`pg_ctl start` on a free 127.0.0.1 port (its socket in that folder, trust authentication),
`pg_ctl stop -m immediate` and the folder removed at the end.

The server binaries are looked up on PATH, then in `/usr/lib/postgresql/<version>/bin` (Debian's
`postgresql` package puts them there). PostgreSQL refuses to run as root: as root the server runs
as the `postgres` system user (`runuser -u postgres --`), which owns the folder.

    with PostgresServer.started() as server:
        url = server.create_database("anomalens")  # postgresql+psycopg://postgres@127.0.0.1:.../

Used by the `postgres` fixture (`tests/conftest.py`) and `benchmarks/station_load.py`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SUPERUSER = "postgres"
HOST = "127.0.0.1"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or no user to run them as."""


def find_bin_dir() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `postgres`: on PATH, else the newest
    `/usr/lib/postgresql/*/bin`; None when there is none."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parents[1].name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    for initdb in sorted(candidates, key=version, reverse=True):
        folder = Path(initdb).parent
        if (folder / "pg_ctl").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throwaway server (see the module's docstring). `durable=False` turns fsync and
    synchronous commits off, for tests that never crash the server itself."""

    def __init__(self, *, durable: bool = True) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                "/usr/lib/postgresql/*/bin; install Debian's `postgresql` package"
            )
        self.bin_dir = bin_dir
        self.durable = durable
        self.as_user: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # the server refuses to run as root
            try:
                self.owner = pwd.getpwnam(SUPERUSER)
            except KeyError as error:
                raise PostgresUnavailable(
                    "running as root and there is no `postgres` system user to run the server as"
                ) from error
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root and `runuser` is not found")
            self.as_user = [runuser, "-u", SUPERUSER, "--"]
        self.root: Path | None = None
        self.port = 0

    # ---- life ---------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def started(cls, *, durable: bool = True) -> Iterator[PostgresServer]:
        server = cls(durable=durable)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [*self.as_user, str(self.bin_dir / args[0]), *args[1:]]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def start(self) -> None:
        # Not under pytest's tmp_path: its folders are private to root, and the server user
        # must be able to reach its own.
        self.root = Path(tempfile.mkdtemp(prefix="anomalens-pg-"))
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            settings = {
                "listen_addresses": HOST,
                "unix_socket_directories": str(self.root),
                "max_connections": "100",
                "shared_buffers": "32MB",
                "dynamic_shared_memory_type": "mmap",
                "timezone": "UTC",
                "logging_collector": "off",
            }
            if not self.durable:
                settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
            with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())
            for attempt in range(3):  # the free port may be taken before the server binds it
                self.port = free_port()
                try:
                    self._run(
                        "pg_ctl",
                        "start",
                        "-w",
                        "-t",
                        "30",
                        "-D",
                        str(self.data),
                        "-l",
                        str(self.root / "server.log"),
                        "-o",
                        f"-p {self.port}",
                    )
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        except BaseException as error:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._remove()
            if tail:
                error.add_note(f"server log:\n{tail}")
            raise

    def stop(self) -> None:
        if self.root is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data), timeout=30)
        self._remove()

    def _remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ---- databases ----------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create the (empty) database `name`; its SQLAlchemy URL."""
        import psycopg

        dsn = f"host={HOST} port={self.port} user={SUPERUSER} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        dsn = f"host={HOST} port={self.port} user={SUPERUSER} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":  # a quick look: start, create a database, stop
    started = time.perf_counter()
    with PostgresServer.started(durable=False) as server:
        print("up in", round(time.perf_counter() - started, 2), "s:", server.create_database("x"))
    print("total", round(time.perf_counter() - started, 2), "s")
