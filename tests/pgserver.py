"""A throwaway PostgreSQL server for the tests and the workers benchmark.

``initdb`` into a temporary directory, ``pg_ctl start`` listening only on a
Unix socket in that directory (no TCP port to collide with), a fresh
database per caller, and ``pg_ctl stop`` plus removal afterwards. ``initdb``
refuses to run as root: as root the server runs as the ``postgres`` system
user that Debian's ``postgresql`` package creates, in a directory it owns.

    with PostgresServer() as server:
        url = server.create_database("s1")   # postgresql://postgres@/s1?host=/tmp/...&port=5432
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

REQUIRE = "AUTOPREC_REQUIRE_POSTGRES"  # set (as .ci/run does) to fail instead of skipping without PostgreSQL
HOW = (
    "install Debian's postgresql package (apt-get install postgresql), which provides initdb and pg_ctl "
    "and the postgres system user, and the driver: pip install 'autoprec[distributed]'"
)


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says what to install."""


def binaries() -> str | None:
    """The directory holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest versioned one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(candidates[-1]) if candidates else None


class PostgresServer:
    """One server in a temporary directory; a context manager that starts and removes it."""

    port = 5432  # only names the socket file: the server listens on no TCP port

    def __init__(self) -> None:
        self.directory: str | None = None
        self._bin = binaries()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _as_owner(self, *command: str) -> list[str]:
        if os.geteuid() != 0:
            return list(command)
        return ["runuser", "-u", "postgres", "--", *command]

    def start(self) -> None:
        try:
            import psycopg2  # noqa: F401  (only whether the driver imports)
        except ImportError:
            raise Unavailable(f"the psycopg2 driver is not installed: {HOW}") from None
        if self._bin is None:
            raise Unavailable(f"initdb and pg_ctl were not found: {HOW}")
        owner = None
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable(f"initdb refuses to run as root and there is no postgres user: {HOW}") from None
        self.directory = tempfile.mkdtemp(prefix="autoprec-pg-")
        if owner is not None:
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        data = os.path.join(self.directory, "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-k {self.directory} -p {self.port} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run(
            "pg_ctl", "-D", data, "-l", os.path.join(self.directory, "log"), "-o", options, "-w", "-t", "60", "start"
        )

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            self._as_owner(os.path.join(self._bin, program), *args), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise Unavailable(f"{program} failed ({done.returncode}): {(done.stderr or done.stdout)[-1000:]}")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.directory}&port={self.port}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self._run("createdb", "-h", self.directory, "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        if self.directory is None:
            return
        data = os.path.join(self.directory, "data")
        if os.path.isdir(data):
            subprocess.run(
                self._as_owner(os.path.join(self._bin, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None
