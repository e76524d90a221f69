"""The Ray session of this process, which every Ray backend shares (colaft.backends.ray).

    address None: start_local -> a private Ray instance on this machine (own folder, own token)
    address "HOST:PORT": check_reachable (seconds, not minutes) -> ray.init(address)
    SESSION: the first backend starts or joins it, the last one to close ends it

Ray allows one session per process: SESSION refuses a backend that asks for another. Ray is
imported only when a session starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

CONNECT_SECONDS = 10.0
"""How long to try reaching a cluster's address before giving up with an error."""


# ---------------------------------------------------------------- a private instance, a cluster's address

def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables; returns their previous values."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def _refresh_auth() -> None:
    """Make Ray's already-loaded C++ side re-read the authentication settings of the environment."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # another Ray version: it reads the environment at start
        pass


@dataclasses.dataclass
class LocalRay:
    """A private Ray instance on this machine (see start_local)."""

    folder: Path  # Ray's files (sockets, logs)
    stop: Callable[[], None]  # shut it down; remove the folder if it was made for it


def start_local(temp_dir: str | Path | None = None, num_cpus: int | None = None) -> LocalRay:
    """Start a Ray instance on this machine for this process.

    Its files go under `temp_dir` (None: a new temporary folder, removed by stop()). Ray
    >= 2.59 turns token authentication on for a new local instance and, when no token is
    configured, writes one to ~/.ray/auth_token; a random token in this process's
    environment (RAY_AUTH_TOKEN, inherited by Ray's processes) keeps the authentication
    and writes nothing to the home folder. A token or mode the user configured is kept.
    """
    import ray

    own_folder = temp_dir is None
    folder = Path(tempfile.mkdtemp(prefix="colaft-ray-") if own_folder else temp_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    configured = any(k in os.environ for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"))
    saved = {} if configured else _set_env({"RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_AUTH_MODE": "token"})
    if saved:
        _refresh_auth()

    def stop() -> None:
        ray.shutdown()
        if saved:
            _set_env(saved)
            _refresh_auth()
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)

    try:
        # "local": a new instance even if RAY_ADDRESS or another local instance is around
        # worker_niceness: Ray starts workers at nice 15, so that an owner's fit, which the server
        # waits for, starves whenever the server's own threads keep the cores busy
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, _temp_dir=str(folder), _system_config={"worker_niceness": 0})
    except BaseException:
        stop()
        raise
    return LocalRay(folder, stop)


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Raise ConnectionError unless a Ray cluster answers at HOST:PORT within about `timeout` seconds.

    ray.init would retry an unreachable address for minutes, so two quick looks first: a TCP
    connection (refused, no route, unknown host), then a Ray GCS client with a deadline
    (something listens, but not Ray: a proxy, another service).
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r}: expected HOST:PORT, as `ray start --head` prints it")
    hint = "start one with `ray start --head` and pass the address it prints"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster reachable at {address} ({e.strerror or e}); {hint}") from None
    if address.startswith("ray://"):
        return  # a Ray Client server, not the cluster's GCS: ray.init talks to it
    try:
        from ray._raylet import InnerGcsClient  # not public API: without it, ray.init's own retries apply
    except ImportError:
        return
    try:
        InnerGcsClient.standalone(address, None, int(timeout * 1000))
    except Exception as e:  # noqa: BLE001 - RpcError, AuthenticationError, ...
        if type(e).__name__ == "AuthenticationError":
            raise ConnectionError(f"the Ray cluster at {address} refuses this process's token ({e}); set "
                                  "RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN here") from None
        raise ConnectionError(f"no Ray cluster reachable at {address}: it answers, but not as Ray "
                              f"({type(e).__name__}: {e}); {hint}") from None


# ---------------------------------------------------------------- one session, shared by the backends

class Session:
    """The Ray session that colaft's backends in this process started (a private instance or a
    joined cluster), shared by all of them: the last one to close shuts it down, so that one
    backend closing (a service's model going idle) never stops another's actors."""

    def __init__(self):
        self.lock = threading.Lock()
        self.holders, self.address, self.folder = 0, None, None
        self.stop: Callable[[], None] | None = None

    def check(self, address: str | None) -> None:
        """Refuse a second session: Ray has one per process."""
        if self.holders and address != self.address:
            where = "locally" if self.address is None else f"at {self.address}"
            raise ValueError(f"this process already runs Ray {where}; one Ray session per process, "
                             f"not also {address or 'a local one'}")

    def join(self, address: str | None, start: Callable[[], tuple[Callable[[], None], Path | None]]):
        """(release, the private instance's folder); `start` runs for the first holder only."""
        with self.lock:
            if not self.holders:
                self.stop, self.folder = start()
                self.address = address
            self.check(address)
            self.holders += 1
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if released.is_set():
                    return
                released.set()
                self.holders -= 1
                if not self.holders:
                    stop, self.stop = self.stop, None
                    stop()
        return release, self.folder


SESSION = Session()
