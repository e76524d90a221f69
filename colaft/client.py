"""`colaft client`: fit a service job's adapters on your own device.

    GET  /v1/fine_tuning/jobs/{id}/fit/state          the owner's state (adapters, optimizer,
                                                      schedule, version) + how to build it
    GET  /v1/fine_tuning/jobs/{id}/fit/packets?after=SEQ&version=V&wait=S
                                                      the server's packets (x, dL/dh) of the
                                                      job's steps after SEQ (long poll)
         -> Owner.push(packets) on this CPU: a fit every `interval` steps (colaft.users)
    POST /v1/fine_tuning/jobs/{id}/fit/updates        the new version: the owner's whole state

Everything on the wire is safetensors (tensors and JSON, never pickle): packets in
colaft.packets' form, states in colaft.io.tensors'. The server keeps the state of the last
update it applied, so a client that is killed and started again resumes from there and
is sent the packets after it again; a push the server already has answers 409
duplicate_update and is simply skipped, any other mismatch (the server restarted from a
checkpoint, another client ran meanwhile) makes the client fetch the state again.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional

import typer

# torch (through colaft's core) and httpx are imported where used, so that `colaft --help` is quick
if TYPE_CHECKING:
    import httpx

    from colaft.users import Owner, Update

FINAL = ("succeeded", "failed", "cancelled")


class ClientError(RuntimeError):
    """The server refused (bad key, no such job, not a client-fit job) or stayed away too long."""


@dataclass
class Summary:
    """What a client run did."""

    job: str
    status: str = "running"
    fine_tuned_model: str | None = None
    messages: int = 0  # server steps (and final flush) received and pushed into the owner
    updates: int = 0  # versions pushed and applied
    duplicates: int = 0  # pushes the server already had (after a lost answer)
    resyncs: int = 0  # restarts from the server's state
    version: int = 0  # the owner's version at the end
    bytes_pulled: int = 0  # response bodies of the packet pulls, as sent (compressed when asked)
    bytes_pushed: int = 0
    fit_seconds: float = 0.0
    wall_seconds: float = 0.0
    start_version: int = 0

    def lines(self) -> list[str]:
        model = f", model {self.fine_tuned_model}" if self.fine_tuned_model else ""
        return [f"job {self.job}: {self.status}{model}",
                f"  {self.messages} messages fitted into versions {self.start_version}..{self.version} "
                f"({self.updates} updates pushed, {self.duplicates} duplicates skipped, {self.resyncs} resyncs)",
                f"  pulled {self.bytes_pulled / 1e6:.2f} MB, pushed {self.bytes_pushed / 1e6:.2f} MB; "
                f"fitting {self.fit_seconds:.1f} s of {self.wall_seconds:.1f} s"]


def build_owner(job: str, meta: dict, state: dict, device: str = "cpu") -> Owner:
    """The job's Owner, rebuilt from fit/state: its adapters from the sites' specs, then the state."""
    from colaft.adapters import SiteSpec, build_adapter
    from colaft.config import ColaConfig
    from colaft.model import _HeadConfig
    from colaft.users import FitConfig, Owner

    config = ColaConfig.from_dict(meta["cola_config"])
    adapters = {}
    for name, site in meta["sites"].items():
        spec = SiteSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in site["spec"].items()})
        adapters[name] = build_adapter("linear", spec, _HeadConfig(bias=site["bias"])) if site["head"] \
            else build_adapter(config.adapter, spec, config)
    owner = Owner(job, adapters, FitConfig(**{**meta["fit_config"], "device": device}))
    owner.load_state(state)
    return owner


class Client:
    """Fits one job's adapters here, until the job is over.

    Args:
        server: the service's URL (http://HOST:PORT, with or without /v1).
        api_key: the job owner's key.
        job: the job id (created with `"colaft": {"fit": "client"}`).
        wait: seconds a pull waits on the server for the next step's packets.
        compress: ask for gzip-compressed packets (pays only on slow links: float
            gradients compress little; see README).
        patience: seconds to keep retrying while the server cannot be reached. A 429 (a
            quota of the server's) is waited out as its Retry-After says, however long.
        device: where the owner fits (a torch device).
    """

    def __init__(self, server: str, api_key: str, job: str, wait: float = 20.0, compress: bool = False,
                 patience: float = 120.0, device: str = "cpu", quiet: bool = False):
        base = server.rstrip("/").removesuffix("/v1")
        self.job, self.wait, self.compress, self.patience, self.device = job, wait, compress, patience, device
        self.quiet = quiet
        self.path = f"/v1/fine_tuning/jobs/{job}"
        import httpx

        self.http = httpx.Client(base_url=base,
                                 headers={"Authorization": f"Bearer {api_key}"}, timeout=wait + 60)
        # the serve processes to ask: the one given first, then those a server named (fit/state's
        # `servers`, a 307's Location); an unreachable one sends the client to the next
        self.servers = [base]
        self.summary = Summary(job)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"colaft client: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------- HTTP, retried while the server is away
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        import httpx

        deadline = time.monotonic() + self.patience
        redirects = 0
        while True:
            try:
                r = self.http.request(method, self.path + path, **kwargs)
            except httpx.TransportError as e:
                if time.monotonic() > deadline:
                    raise ClientError(f"the server cannot be reached for {self.patience:.0f} s: {e}") from None
                self._next_server()
                time.sleep(1.0)
                continue
            if r.status_code == 307 and "location" in r.headers and redirects < 8:
                # another serve process trains the job: ask it, with the same key (httpx would drop it)
                redirects += 1
                self._use(str(httpx.URL(r.headers["location"]).copy_with(path="/", query=None, fragment=None)))
                continue
            if r.status_code == 429:  # a quota of requests or of polls: the server says when to come back
                wait = retry_after(r)
                self.say(f"{_message(r)} (429): asking again in {wait:g} s")
                time.sleep(wait)
                deadline = time.monotonic() + self.patience  # the server is there: patience starts again
                continue
            if r.status_code in (401, 404, 422) or (r.status_code == 400 and _code(r) == "invalid_value") \
                    or (r.status_code == 409 and _code(r) == "not_a_client_job"):
                raise ClientError(f"{r.status_code}: {_message(r)}")
            if r.status_code >= 500 or (r.status_code == 409 and _code(r) == "job_not_started"):
                if time.monotonic() > deadline:
                    raise ClientError(f"{r.status_code}: {_message(r)}")
                time.sleep(1.0)
                continue
            return r

    def _use(self, server: str) -> None:
        server = server.rstrip("/")
        if server not in self.servers:
            self.servers.append(server)
        if str(self.http.base_url).rstrip("/") != server:
            self.say(f"asking {server}")
            self.http.base_url = server

    def _next_server(self) -> None:
        """The server asked did not answer: ask the next one known (they send the client on to
        whichever process trains the job now)."""
        now = str(self.http.base_url).rstrip("/")
        at = self.servers.index(now) if now in self.servers else -1
        self._use(self.servers[(at + 1) % len(self.servers)])

    def fetch_state(self) -> tuple[Owner, int] | None:
        """The owner as the server last saw it and the message it covers; None once the job is over."""
        r = self._request("GET", "/fit/state")
        if r.headers.get("content-type", "").startswith("application/json"):
            self._over(r.json())
            return None
        from colaft.io.tensors import state_from_bytes

        state, meta = state_from_bytes(r.content)
        for server in meta.get("servers", []):
            if server.rstrip("/") not in self.servers:
                self.servers.append(server.rstrip("/"))
        owner = build_owner(self.job, meta, state, self.device)
        self.meta = meta
        return owner, meta["seq"]

    def push(self, update: Update, owner: Owner, seq: int) -> str:
        """'applied', 'duplicate' or 'resync'."""
        meta = {"version": update.version, "seq": seq, "skipped": update.states is None, "rows": update.rows,
                "lr": update.lr}
        from colaft.io.tensors import state_to_bytes

        body = state_to_bytes(owner.state(), meta)
        r = self._request("POST", "/fit/updates", content=body,
                          headers={"Content-Type": "application/octet-stream"})
        self.summary.bytes_pushed += len(body)
        if r.status_code == 200:
            self.summary.updates += 1
            return "applied"
        if r.status_code == 409 and _code(r) == "duplicate_update":
            self.summary.duplicates += 1
            return "duplicate"
        if r.status_code == 409 and _code(r) == "job_finished":
            return "over"
        self.say(f"update {update.version} refused ({_message(r)}); starting again from the server's state")
        return "resync"

    def _over(self, body: dict) -> None:
        self.summary.status = body.get("status", "unknown")
        self.summary.fine_tuned_model = body.get("fine_tuned_model")

    # ------------------------------------------------------------- the loop
    def run(self) -> Summary:
        start = time.perf_counter()
        try:
            self._run()
        finally:
            self.summary.wall_seconds = time.perf_counter() - start
            self.http.close()
        return self.summary

    def _run(self) -> None:
        from colaft.packets import packets_from_bytes

        got = self.fetch_state()
        if got is None:
            return
        owner, seq = got
        self.summary.start_version = owner.version
        self.say(f"job {self.job}: fitting on {self.device} from version {owner.version} (step {seq}); "
                 f"interval {owner.config.interval}, staleness {self.meta['staleness']}")
        while True:
            params = {"after": seq, "version": owner.version, "wait": self.wait}
            if self.compress:
                params["compress"] = "gzip"
            r = self._request("GET", "/fit/packets", params=params)
            self.summary.bytes_pulled += r.num_bytes_downloaded  # as sent: compressed when asked
            if r.status_code == 204:
                continue
            if r.status_code == 409:
                self.say(f"{_message(r)}")
                self.summary.resyncs += 1
                got = self.fetch_state()
                if got is None:
                    return
                owner, seq = got
                continue
            if r.status_code != 200:
                raise ClientError(f"{r.status_code}: {_message(r)}")
            if r.headers.get("content-type", "").startswith("application/json"):
                self._wait_final(r.json())
                self.summary.version = owner.version
                return
            packets = packets_from_bytes(r.content)
            at = 0
            for mseq, kind, count in json.loads(r.headers["x-colaft-messages"]):
                t = time.perf_counter()
                update = owner.push(packets[at:at + count]) if kind == "push" else owner.flush()
                self.summary.fit_seconds += time.perf_counter() - t
                at += count
                seq = mseq
                self.summary.messages += 1
                if update is None:
                    continue
                outcome = self.push(update, owner, seq)
                if outcome == "resync":
                    self.summary.resyncs += 1
                    got = self.fetch_state()
                    if got is None:
                        return
                    owner, seq = got
                    break
                if outcome == "over":
                    break
            self.summary.version = owner.version

    def _wait_final(self, body: dict) -> None:
        """The job is over on the channel; its row says how, a moment later at most."""
        deadline = time.monotonic() + 60
        while body.get("status") not in FINAL and time.monotonic() < deadline:
            time.sleep(0.2)
            r = self._request("GET", "")
            body = r.json() if r.status_code == 200 else body
        self._over(body)


def retry_after(r: httpx.Response, default: float = 1.0, most: float = 3600.0) -> float:
    """Seconds a 429's Retry-After asks to wait (a number of seconds, or an HTTP date); `default`
    when it is missing or unreadable; at least 0.1 s (no busy loop), never more than `most`."""
    from email.utils import parsedate_to_datetime

    value = r.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = default
    return min(max(seconds, 0.1), most) if seconds == seconds else default  # NaN: the default


def _code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):  # not JSON, or not our error shape
        return None


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or r.reason_phrase


def client(
    job: Annotated[str, typer.Option(help="The fine-tuning job (created with \"colaft\": {\"fit\": \"client\"}).")],
    server: Annotated[str, typer.Option(help="The service's URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], typer.Option(
        help="Your API key (default: $COLAFT_API_KEY; @FILE reads it from a file).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds a pull waits on the server for the next step.")] = 20.0,
    compress: Annotated[bool, typer.Option(help="Ask for gzip-compressed packets (for slow links).")] = False,
    patience: Annotated[float, typer.Option(help="Seconds to keep retrying while the server is away.")] = 120.0,
    device: Annotated[str, typer.Option(help="Where the fits run (a torch device).")] = "cpu",
) -> int:
    """Fit a service job's adapters on this machine: pull its packets, fit, push the updates, until it ends."""
    import os

    from colaft.runtime import set_threads

    key = api_key or os.environ.get("COLAFT_API_KEY")
    if not key:
        raise ValueError("give --api-key KEY (or @FILE), or set COLAFT_API_KEY")
    if key.startswith("@"):
        with open(key[1:]) as f:
            key = f.read().strip()
    set_threads()
    try:
        summary = Client(server, key, job, wait, compress, patience, device).run()
    except ClientError as e:
        raise ValueError(str(e)) from None
    print("\n".join(summary.lines()))
    return 0 if summary.status == "succeeded" else 1
