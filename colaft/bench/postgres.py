"""A throwaway PostgreSQL cluster for the service's tests and benchmarks (several serve processes
on one database need a database server; SQLite serves one process).

    Cluster.find()   the folder of PostgreSQL's server binaries (initdb, pg_ctl), or None
    start()          initdb into a new temporary folder (trust authentication, no fsync),
                     listening on a free loopback port and a socket in that folder, and the
                     database `colaft`; returns its SQLAlchemy URL
    database(name)   one more database on it; its URL
    stop()           pg_ctl stop, and the folder removed

It touches no other PostgreSQL. initdb refuses to run as root, so as root the cluster runs as
the `postgres` user (runuser); `Cluster` raises RuntimeError where that user does not exist.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from colaft.serve.launch import free_port


class Cluster:
    """A PostgreSQL cluster: its data, socket and log in one temporary folder."""

    def __init__(self, bin_dir: Path, port: int | None = None):
        self.bin, self.port = bin_dir, port or free_port()
        self.as_user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                self.as_user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the cluster as") from None
        self.dir = Path(tempfile.mkdtemp(prefix="colaft-pg-"))  # not under a root-only temporary folder
        if self.as_user:
            os.chown(self.dir, self.as_user.pw_uid, self.as_user.pw_gid)

    @staticmethod
    def find() -> Path | None:
        """The folder of PostgreSQL's server binaries (initdb, pg_ctl), or None."""
        found = shutil.which("initdb") or shutil.which("pg_ctl")
        if found:
            return Path(os.path.realpath(found)).parent
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(candidates[-1]).parent if candidates else None

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_user:
            command = ["runuser", "-u", self.as_user.pw_name, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        """Start it and create the database `colaft`; returns its SQLAlchemy URL."""
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "colaft", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c max_connections=400", "start")
        return self.database("colaft")

    def database(self, name: str) -> str:
        """A new database `name` on the cluster; its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"postgresql://colaft@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://colaft@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "-t", "60", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
