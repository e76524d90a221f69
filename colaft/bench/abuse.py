"""The hostile clients of `colaft bench serve --abuse`: everything a service must survive, at once,
while the well-behaved users of colaft.bench.serve_load go on.

    Hostile(url, keys, model, scale).run(stop)   one coroutine per attack and slot (ATTACKS),
                                                 each looping until `stop`, then cancelled
    Hostile(...).run_apart(seconds)              the same for `seconds`, in a process of its own
    RssSampler(pid)                              the server process's resident set, sampled
                                                 every 0.1 s in a thread: baseline, peak
    probe_apart(url, key, job, seconds, rec)     /health and a job's status every 0.2 s, from a
                                                 process that does nothing else

Every attack comes from hostile users' own API keys (never a good user's), so the good users'
rate quota and jobs are their own. Each attack is bounded: `scale` sets its concurrency, every
request has a timeout, every connection is closed when the attack is stopped. Outcomes are
counted per attack and status (0: the connection was closed or failed, as the server may do
to a body it refuses; open: still waiting when the attack ended); a hostile request's
failure is the expected answer, not an error.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

REGEX = "([a-z._0-9]+)+!"
"""A catastrophic target regex for a backtracking matcher (2**n ways to split each module name)."""
MAX_UPLOAD_MB = 4
"""The server's --max-upload-mb in the abuse run; the huge uploads send a little more."""
RATE_PER_MINUTE = 600
"""The server's --max-requests-per-minute-per-user in the abuse run: well above a good user's
~70 a minute (one request a second), well below a flood's."""
ATTACKER_NICENESS = 10
"""The attacking process's niceness. An attacker elsewhere takes none of the server's cores; here,
as busy as the server's event loop, it took a core from it at niceness 0 (BENCHMARKS.md, "Under
attack"). At 10 it runs on what the server leaves, as the server's training threads do."""


class Hostile:
    """The attacks on the server at `url`, from the hostile users' `keys` (at least 2)."""

    def __init__(self, url: str, keys: list[str], model: str, scale: float = 1.0, timeout: float = 30.0,
                 niceness: int = ATTACKER_NICENESS):
        self.url, self.keys, self.model, self.scale, self.timeout = url, keys, model, scale, timeout
        self.niceness, self.ran_at = niceness, None  # of the attacking process (`run_apart`), asked and as it said
        split = urlsplit(url)
        self.host, self.port = split.hostname, split.port
        self.outcomes: dict[str, Counter] = {}
        self.file_id: str | None = None
        self.poll_job: str | None = None
        self.poll_after = 0
        # one TLS context for every client: httpx builds one per client otherwise (~30 ms of CPU
        # each), and a window's 250 clients would spend seconds of it before attacking
        self.tls = ssl.create_default_context()

    # ------------------------------------------------------------ plumbing

    def count(self, attack: str, status: int | str) -> None:
        self.outcomes.setdefault(attack, Counter())[str(status)] += 1

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout, verify=self.tls)

    async def send(self, attack: str, h: httpx.AsyncClient, method: str, path: str, **kw) -> httpx.Response | None:
        try:
            r = await h.request(method, path, **kw)
        except httpx.HTTPError:
            self.count(attack, 0)
            return None
        except asyncio.CancelledError:
            self.count(attack, "open")  # still waiting when the attack ended
            raise
        self.count(attack, r.status_code)
        return r

    async def raw(self, attack: str, head: bytes, body: bytes = b"", every: float = 0.0) -> None:
        """A request written on a socket of its own: `head`, then `body` (one byte each `every` s when set)."""
        writer = None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(head)
            if every:
                for i in range(len(body)):
                    writer.write(body[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(every)
            else:
                writer.write(body)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            parts = line.split()
            self.count(attack, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)
        except (TimeoutError, OSError):
            self.count(attack, 0)
        except asyncio.CancelledError:
            self.count(attack, "open")
            raise
        finally:
            if writer is not None:
                writer.close()

    def _head(self, method: str, path: str, key: str, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Authorization: Bearer {key}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def setup(self) -> None:
        """A hostile user's file and a client-fit job with no client: the long polls' target."""
        async with self.client(self.keys[0]) as h:
            lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 160
            r = await h.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("h.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())})
            r.raise_for_status()
            self.file_id = r.json()["id"]
            r = await h.post("/v1/fine_tuning/jobs", json={"model": self.model, "training_file": self.file_id,
                                                           "hyperparameters": {"n_epochs": 50},
                                                           "colaft": {"fit": "client"}})
            r.raise_for_status()
            self.poll_job = r.json()["id"]

    # ------------------------------------------------------------ the attacks (one slot each)

    async def oversized(self, stop: asyncio.Event) -> None:
        """Bodies past the 1 MiB cap: declared by Content-Length, streamed chunked, and sent whole."""
        key = self.keys[1]

        async def chunks():
            for _ in range(64):
                yield b"x" * 65536

        async with self.client(key) as h:
            while not stop.is_set():
                await self.raw("oversized", self._head("POST", "/v1/fine_tuning/jobs", key, {
                    "Content-Type": "application/json", "Content-Length": str(10**9)}), b"{" * 1024)
                await self.send("oversized", h, "POST", "/v1/fine_tuning/jobs", content=chunks(),
                                headers={"Content-Type": "application/json"})
                await self.send("oversized", h, "POST", "/v1/chat/completions", content=b" " * (2 << 20),
                                headers={"Content-Type": "application/json"})

    async def malformed(self, stop: asyncio.Event) -> None:
        """Deeply nested JSON, non-finite numbers, a catastrophic regex, bad names and ids."""
        model, file = json.dumps(self.model), json.dumps(self.file_id)
        nested = "[" * 50000 + "]" * 50000
        bodies = [
            ("/v1/fine_tuning/jobs", f'{{"model": {model}, "training_file": "x", "metadata": {nested}}}'),
            ("/v1/fine_tuning/jobs", f'{{"model": {model}, "training_file": {file}, "colaft": {{"alpha": 1e999}}}}'),
            ("/v1/chat/completions", f'{{"model": {model}, "temperature": NaN, "messages": [{{"role": "user", '
                                     '"content": "hi"}]}'),
            ("/v1/fine_tuning/jobs", json.dumps({"model": self.model, "training_file": self.file_id,
                                                 "colaft": {"targets": REGEX}})),
            ("/v1/chat/completions", json.dumps({"model": "../../etc/passwd\x00", "messages": [
                {"role": "user", "content": "hi"}]})),
            ("/v1/fine_tuning/jobs", json.dumps({"model": "ft:" + "x" * 5000, "training_file": "../" * 100}))]
        gets = ["/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/fine_tuning/jobs/" + "%00" * 300,
                "/v1/fine_tuning/jobs/ftjob-" + "9" * 4000 + "/events", "/v1/files/%F0%9F%92%A3/content"]
        async with self.client(self.keys[1]) as h:
            while not stop.is_set():
                for path, body in bodies:
                    await self.send("malformed", h, "POST", path, content=body,
                                    headers={"Content-Type": "application/json"})
                for path in gets:
                    await self.send("bad names", h, "GET", path)

    async def uploads(self, stop: asyncio.Event) -> None:
        """Multipart bodies: a broken boundary, thousands of fields, and a file past --max-upload-mb."""
        key = self.keys[1]
        broken = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nxx" * 100
        fields = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i
                          for i in range(5000)) + b"--b--\r\n"
        huge = b"x" * ((MAX_UPLOAD_MB << 20) + (1 << 20))
        async with self.client(key) as h:
            while not stop.is_set():
                for body in (broken, fields):
                    await self.send("multipart", h, "POST", "/v1/files", content=body,
                                    headers={"Content-Type": "multipart/form-data; boundary=b"})
                await self.send("multipart", h, "POST", "/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("huge.jsonl", huge)})

    async def keys_in_query(self, stop: asyncio.Event) -> None:
        """A key in the query string (never taken), and made-up keys in the header: 401s."""
        async with self.client() as anonymous, self.client("sk-colaft-not-a-key") as wrong:
            while not stop.is_set():
                await self.send("invalid keys", anonymous, "GET", "/v1/files", params={"api_key": self.keys[1]})
                await self.send("invalid keys", wrong, "GET", "/v1/fine_tuning/jobs")
                await self.send("invalid keys", anonymous, "POST", "/v1/chat/completions",
                                headers={"Authorization": "Bearer " + "A" * 4000}, json={})

    async def flood(self, stop: asyncio.Event) -> None:
        """Requests as fast as they go from one key, past its rate quota: 429s."""
        async with self.client(self.keys[1]) as h:
            while not stop.is_set():
                await self.send("flood", h, "GET", "/v1/models")

    async def long_poll(self, stop: asyncio.Event) -> None:
        """A long poll of the client-fit job's packets after the newest message: it waits up to 20 s."""
        async with self.client(self.keys[0]) as h:
            while not stop.is_set():
                r = await self.send("long polls", h, "GET", f"/v1/fine_tuning/jobs/{self.poll_job}/fit/packets",
                                    params={"after": self.poll_after, "wait": 20})
                if r is not None and r.status_code == 200 and "x-colaft-messages" in r.headers:
                    self.poll_after = max(self.poll_after, *(m[0] for m in json.loads(r.headers["x-colaft-messages"])))
                elif r is None or r.status_code >= 400:
                    await asyncio.sleep(0.5)

    async def hog(self, stop: asyncio.Event) -> None:
        """The longest completion there is: max_tokens at its cap."""
        async with self.client(self.keys[0]) as h:
            h.timeout = httpx.Timeout(600)
            while not stop.is_set():
                await self.send("long completions", h, "POST", "/v1/chat/completions", json={
                    "model": self.model, "max_tokens": 4096, "messages": [{"role": "user", "content": "hi " * 200}]})

    async def slowloris(self, stop: asyncio.Event) -> None:
        """A connection that sends its body one byte a second."""
        key = self.keys[1]
        body = json.dumps({"model": self.model, "training_file": "file-x"}).encode()
        head = self._head("POST", "/v1/fine_tuning/jobs", key, {"Content-Type": "application/json",
                                                                "Content-Length": str(len(body))})
        while not stop.is_set():
            await self.raw("slowloris", head, body, every=1.0)

    # ------------------------------------------------------------ running them

    def slots(self) -> list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]]:
        """(attack, coroutine function) per slot: ATTACKS' concurrency times `scale`, at least 1."""
        return [(name, getattr(self, name)) for name, n in ATTACKS.items()
                for _ in range(max(1, round(n * self.scale)))]

    async def run(self, stop: asyncio.Event) -> None:
        """Every slot until `stop` is set, then every one cancelled (a long poll or a slow body mid-way)."""
        tasks = [asyncio.create_task(fn(stop)) for _, fn in self.slots()]
        await stop.wait()
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


    async def run_apart(self, seconds: float) -> None:
        """`run` for `seconds` in a process of its own (`attack_main`), its outcomes added to ours.
        An attacker's hundreds of connections cost its own event loop seconds of work under load:
        sharing the measuring process's loop, they would delay the good users' requests there,
        and the latencies measured would be the bench's own, not the server's."""
        spec = {"url": self.url, "keys": self.keys, "model": self.model, "scale": self.scale,
                "timeout": self.timeout, "poll_job": self.poll_job, "seconds": seconds, "niceness": self.niceness}
        ran = await _apart("attack_main", spec)
        self.ran_at = ran["niceness"]
        for attack, counts in ran["outcomes"].items():
            self.outcomes.setdefault(attack, Counter()).update(counts)


async def _apart(main: str, spec: dict):
    """What this module's function `main` prints (JSON), run in a new process with `spec` (JSON) as argument."""
    from colaft.serve.launch import SOURCE

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"from colaft.bench.abuse import {main}; {main}()", json.dumps(spec),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SOURCE)})
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{main} exited with status {proc.returncode}")
    return json.loads(out)


def attack_main() -> None:
    """The attacking process of `Hostile.run_apart`: spec (JSON) in argv[1]; niceness, outcomes (JSON) on stdout."""
    spec = json.loads(sys.argv[1])
    os.setpriority(os.PRIO_PROCESS, 0, max(spec["niceness"], os.nice(0)))  # never below ours (not allowed)
    hostile = Hostile(spec["url"], spec["keys"], spec["model"], spec["scale"], spec["timeout"])
    hostile.poll_job = spec["poll_job"]

    async def attack() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(spec["seconds"], stop.set)
        await hostile.run(stop)

    asyncio.run(attack())
    print(json.dumps({"niceness": os.nice(0), "outcomes": {k: dict(v) for k, v in hostile.outcomes.items()}}))


ATTACKS = {"oversized": 2, "malformed": 2, "uploads": 1, "keys_in_query": 2, "flood": 8, "long_poll": 200,
           "hog": 2, "slowloris": 32}
"""Concurrent slots per attack at scale 1."""


class RssSampler:
    """The resident set of process `pid` (bytes), sampled every `every` s in a thread: the
    baseline, the peak, a timeline (the peak of each second) and, read when asked, now."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.process, self.every = psutil.Process(pid), every
        self.baseline = self.peak = self.process.memory_info().rss
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, peak of that second)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self.baseline = self.peak = self.process.memory_info().rss
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                rss = self.process.memory_info().rss
            except Exception:  # the server is gone
                return
            self.peak = max(self.peak, rss)
            second = round(time.monotonic() - self._t0)
            if self.timeline and self.timeline[-1][0] == second:
                self.timeline[-1] = (second, max(self.timeline[-1][1], rss))
            else:
                self.timeline.append((second, rss))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        mb = 1 / 2**20
        return {"baseline_mb": self.baseline * mb, "peak_mb": self.peak * mb,
                "growth_mb": (self.peak - self.baseline) * mb, "at": time.time(),
                "timeline_mb": [(t, round(rss * mb, 1)) for t, rss in self.timeline]}

    def now_mb(self) -> float:
        """The resident set now (MiB)."""
        return self.process.memory_info().rss / 2**20


# ---------------------------------------------------------------- the good side, measured under attack

async def probe_apart(url: str, key: str, job: str, seconds: float, rec, every: float = 0.2) -> None:
    """GET /health (no key, like a load balancer), then a good user's job status, every `every` s
    for `seconds`, from a process of its own that does nothing else (`probe_main`): what the
    server answers in, not how long the 64 users' busy event loop takes to read it (their own
    status calls are measured too, in their process). Recorded as good requests of the load
    window, kinds "health" and "probe status"."""
    from colaft.bench.serve_load_report import Sample

    spec = {"url": url, "key": key, "job": job, "seconds": seconds, "every": every}
    for kind, wall, took, status in await _apart("probe_main", spec):
        rec.samples.append(Sample(kind, "load", wall - rec.wall_zero, took, status))


def probe_main() -> None:
    """The probing process of `probe_apart`: its spec (JSON) in argv[1]; [kind, wall-clock start,
    seconds, status] of every request (JSON) on stdout."""
    spec = json.loads(sys.argv[1])
    probes = [("health", "/health", {}),
              ("probe status", f"/v1/fine_tuning/jobs/{spec['job']}", {"Authorization": f"Bearer {spec['key']}"})]
    samples, deadline = [], time.monotonic() + spec["seconds"]
    with httpx.Client(base_url=spec["url"], timeout=60) as h:
        while time.monotonic() < deadline:
            for kind, path, headers in probes:
                wall, t0 = time.time(), time.perf_counter()
                try:
                    status = h.get(path, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                samples.append([kind, wall, time.perf_counter() - t0, status])
            time.sleep(spec["every"])
    print(json.dumps(samples))


async def short_job(h: httpx.AsyncClient, job: str, model: str, epochs: int, rec, made: dict[str, str]) -> None:
    """A good user's second job, on the file of its first, short enough to succeed during the run;
    added to `made` as {job: its owner's key}."""
    r = await rec.call(h, "status", "load", "GET", f"/v1/fine_tuning/jobs/{job}")
    if r is None or r.status_code != 200:
        return
    r = await rec.call(h, "create", "load", "POST", "/v1/fine_tuning/jobs", json={
        "model": model, "training_file": r.json()["training_file"], "hyperparameters": {"n_epochs": epochs}})
    if r is not None and r.status_code == 200:
        made[r.json()["id"]] = h.headers["authorization"].removeprefix("Bearer ")


def final_statuses(url: str, owners: dict[str, str], timeout: float) -> dict[str, str]:
    """Each job's status ({job: owner's key}) once every one is over or `timeout` s passed: {job: status}."""
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=60) as h:
        while True:
            for job, key in owners.items():
                if statuses.get(job) not in ("succeeded", "failed", "cancelled"):
                    r = h.get(f"/v1/fine_tuning/jobs/{job}", headers={"Authorization": f"Bearer {key}"})
                    statuses[job] = r.json()["status"] if r.status_code == 200 else f"HTTP {r.status_code}"
            if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()) \
                    or time.monotonic() > deadline:
                return statuses
            time.sleep(1.0)
