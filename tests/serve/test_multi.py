"""Several `colaft serve` processes on one PostgreSQL database and one data folder
(colaft.serve.leases): jobs spread over them, one is SIGKILLed mid-training, another takes its
jobs over from their checkpoints, every job succeeds with the adapters of an uninterrupted run;
a thread samples the leases from the database throughout. And the embedded default: a second
process on one SQLite data folder is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from serve_helpers import CHAT, REPO, Server, adapter, add_user, assert_same, upload, wait_for, wait_job

from colaft.serve.commands import _only_server

LEASE = 4.0
"""--lease-seconds of the servers: short, so that the takeover (and the test) is."""
TAKEOVER_LIMIT = 30.0


class LeaseWatch(threading.Thread):
    """Samples every job's lease (owner, expiry, on the database's clock) every 50 ms. A job's
    owners follow one another, each the only one: the next owner's first expiry seen, less the
    lease, is when it claimed at the latest, and that must be past the last expiry seen of the
    one before (a claim takes only an expired lease)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url.replace("+psycopg", "")
        self.done = threading.Event()
        self.history: dict[str, list[list]] = {}  # job -> [owner, first expiry, last expiry, monotonic first seen]
        self.unknown: list[tuple[str, str]] = []  # (job, owner) with no row in servers
        self.samples = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as c:
            while not self.done.is_set():
                t = time.monotonic()
                servers = {row[0] for row in c.execute("SELECT id FROM servers")}
                for job, owner, expires in c.execute("SELECT id, lease_owner, lease_expires_at FROM jobs"):
                    if owner is None:
                        continue
                    if owner not in servers:
                        self.unknown.append((job, owner))
                    h = self.history.setdefault(job, [])
                    if not h or h[-1][0] != owner:
                        h.append([owner, expires, expires, t])
                    else:
                        h[-1][2] = max(h[-1][2], expires)
                self.samples += 1
                time.sleep(0.05)

    def owners(self, job: str) -> list[str]:
        return [h[0] for h in self.history.get(job, [])]

    def check(self) -> None:
        assert self.samples > 20 and not self.unknown, self.unknown[:3]
        for job, h in self.history.items():
            for before, after in zip(h, h[1:]):
                assert after[1] - LEASE >= before[2] - 0.01, f"{job}: {after[0]} claimed a live lease of {before[0]}"


def _step(c, job: str) -> int:
    """The newest step the job's events recorded."""
    return c.execute("SELECT coalesce(max(CAST(data->>'step' AS INTEGER)), 0) FROM events WHERE job_id = %s "
                     "AND type = 'metrics'", (job,)).fetchone()[0]


@pytest.mark.parametrize("n", [2, 3])
def test_servers_share_jobs_and_take_a_killed_ones_over(n, postgres, tmp_path, tiny_llama_dir):
    from colaft.client import Client

    url = postgres.database(f"multi{n}")
    plain = url.replace("+psycopg", "")
    data = tmp_path / "data"
    key = add_user(data, "erin", url)
    servers = [Server(data, [f"llama={tiny_llama_dir}"], "--database-url", url, "--backend", "inline",
                      "--checkpoint-every", "5", "--lease-seconds", str(LEASE), "--client-timeout", "60")
               .start(wait=False) for _ in range(n)]
    watch = LeaseWatch(url)
    try:
        for s in servers:
            s.wait_ready(180)
        watch.start()
        clients = [s.client(key) for s in servers]
        f = upload(clients[0], CHAT)
        hyper = {"n_epochs": 40, "batch_size": 2}
        jobs = [clients[i % n].fine_tuning.jobs.create(model="llama", training_file=f.id, seed=10 + i,
                                                       hyperparameters=hyper).id for i in range(2 * n)]
        fit_job, together = None, []
        if n == 2:  # two collaborative jobs (their mean couples them: one process trains both)
            together = [clients[i].fine_tuning.jobs.create(
                model="llama", training_file=f.id, seed=50 + i, hyperparameters={"n_epochs": 2, "batch_size": 2},
                extra_body={"colaft": {"mode": "collaborative"}}).id for i in range(2)]
        if n == 2:  # a client-fit job: its client asks the process that does not hold it
            fit_job = clients[1].fine_tuning.jobs.create(model="llama", training_file=f.id, seed=99,
                                                         hyperparameters=hyper, extra_body={"colaft": {"fit": "client"}}
                                                         ).id
        with psycopg.connect(plain, autocommit=True) as c:
            ids = dict(wait_for(lambda: (rows := c.execute("SELECT url, id FROM servers").fetchall())
                                and len(rows) == n and rows, 30))
            by_id = {ids[s.url]: s for s in servers}
            all_jobs = jobs + ([fit_job] if fit_job else [])
            owner = wait_for(lambda: (o := dict(c.execute("SELECT id, lease_owner FROM jobs").fetchall()))
                             and all(o.get(j) for j in all_jobs) and o, 30)
            assert set(owner[j] for j in jobs) == set(by_id), "every process trains some of the jobs"
            summary = {}
            if fit_job:
                holder = by_id[owner[fit_job]]
                home = next(s for s in servers if s is not holder)
                thread = threading.Thread(target=lambda: summary.update(
                    s=Client(home.url, key, fit_job, wait=2, patience=120, quiet=True).run()), daemon=True)
                thread.start()
                victim = holder
            else:
                victim = by_id[owner[jobs[-1]]]
            theirs = [j for j in all_jobs if by_id[owner[j]] is victim]
            wait_for(lambda: all(_step(c, j) >= 7 for j in theirs), 120, 0.05)  # past a checkpoint (5)
            killed = time.monotonic()
            victim.stop(signal.SIGKILL)
            survivors = [s for s in servers if s is not victim]
            taken = wait_for(lambda: all(len(watch.owners(j)) > 1 for j in theirs) and time.monotonic(),
                             TAKEOVER_LIMIT + 10, 0.05)
            resumed = wait_for(lambda: all(c.execute("SELECT count(*) FROM events WHERE job_id = %s AND message "
                                                     "LIKE 'Resumed from the checkpoint at step %%'", (j,)
                                                     ).fetchone()[0] for j in theirs) and time.monotonic(),
                               TAKEOVER_LIMIT + 10, 0.05)
        print(f"\n{n} servers: {len(theirs)} jobs of the killed one leased again after {taken - killed:.1f} s, "
              f"resumed after {resumed - killed:.1f} s")
        assert resumed - killed < TAKEOVER_LIMIT
        client = survivors[0].client(key)
        for j in all_jobs + together:
            done = wait_job(client, j, 240)
            assert done.status == "succeeded", (j, done.error)
        if together:
            assert watch.owners(together[0])[0] == watch.owners(together[1])[0]
        if n == 3:  # a fine-tuned model answers on a process that did not train it (adapters from the shared folder)
            trainer = next(s for s in by_id.values() if s is not victim and
                           any(watch.owners(j)[-1] == ids[s.url] for j in jobs))
            trained = next(j for j in jobs if watch.owners(j)[-1] == ids[trainer.url])
            other = next(s for s in survivors if s is not trainer).client(key)
            answer = other.chat.completions.create(model=client.fine_tuning.jobs.retrieve(trained).fine_tuned_model,
                                                   max_tokens=4, messages=[{"role": "user", "content": "who are you"}])
            assert answer.choices[0].message.content is not None
        if fit_job:
            thread.join(60)
            assert summary["s"].status == "succeeded" and summary["s"].updates > 0
            assert 'fit/state HTTP/1.1" 307' in home.log_text()  # sent on to the job's holder, at first
        # the killed one's jobs end with the adapters of an uninterrupted run (same seed and data)
        survivors[0].keys = {"erin": key}
        for j in [j for j in theirs if j != fit_job]:
            ref = wait_job(client, client.fine_tuning.jobs.create(
                model="llama", training_file=f.id, seed=client.fine_tuning.jobs.retrieve(j).seed,
                hyperparameters=hyper).id, 240)
            assert ref.status == "succeeded", ref.error
            assert_same(adapter(survivors[0], "erin", j), adapter(survivors[0], "erin", ref.id))
        if n == 3:  # a pause, resume and cancel made through a process that does not train the job
            _followed_elsewhere(plain, ids, survivors, key)
            _one_mean_everywhere(survivors, ids, watch, key, f.id)
        watch.done.set()
        watch.join(10)
        watch.check()
        assert all(len(watch.owners(j)) == 2 for j in theirs)  # the killed one's, then a survivor's
        assert all(len(watch.owners(j)) == 1 for j in jobs if j not in theirs)
    finally:
        watch.done.set()
        for s in servers:
            s.stop()


def _followed_elsewhere(url: str, ids: dict, live: list[Server], key: str) -> None:
    """A job paused, resumed and cancelled through another process than its holder's: the holder
    follows each (its steps stop, go on, stop)."""
    client = live[0].client(key)
    job = client.fine_tuning.jobs.create(model="llama", training_file=upload(client, CHAT * 4).id, seed=7,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1}).id
    with psycopg.connect(url, autocommit=True) as c:
        wait_for(lambda: _step(c, job) >= 3, 60, 0.05)
        holder = c.execute("SELECT lease_owner FROM jobs WHERE id = %s", (job,)).fetchone()[0]
        other = next(s for s in live if ids[s.url] != holder).client(key)

        def still() -> bool:  # no step for a second (the holder looks every 0.5 s)
            time.sleep(1.0)
            before = _step(c, job)
            time.sleep(1.5)
            return _step(c, job) == before

        assert other.fine_tuning.jobs.pause(job).status == "paused"
        assert still()
        assert other.fine_tuning.jobs.resume(job).status == "running"
        paused_at = _step(c, job)
        wait_for(lambda: _step(c, job) > paused_at + 2, 30, 0.05)
        assert other.fine_tuning.jobs.cancel(job).status == "cancelled"
        assert still()


def _one_mean_everywhere(live: list[Server], ids: dict, watch: LeaseWatch, key: str, file: str) -> None:
    """Two collaborative jobs train on one process; their model answers the same on another
    process, which loaded both finished deltas (the mean) from the shared folder."""
    client = live[0].client(key)
    jobs = [client.fine_tuning.jobs.create(model="llama", training_file=file, seed=60 + i,
                                           hyperparameters={"n_epochs": 2, "batch_size": 2},
                                           extra_body={"colaft": {"mode": "collaborative"}}).id for i in range(2)]
    done = [wait_job(client, j, 120) for j in jobs]
    assert all(d.status == "succeeded" for d in done)
    trainer = {watch.owners(j)[-1] for j in jobs}
    assert len(trainer) == 1
    time.sleep(3)  # the others look for models finished elsewhere every 2 s

    def answer(server: Server):
        got = server.client(key).chat.completions.create(
            model=done[0].fine_tuned_model, max_tokens=4, logprobs=True, temperature=0,
            messages=[{"role": "user", "content": "who are you"}]).choices[0].logprobs.content
        return [t.logprob for t in got]

    there = next(s for s in live if ids[s.url] in trainer)
    elsewhere = next(s for s in live if ids[s.url] not in trainer)
    assert answer(elsewhere) == pytest.approx(answer(there), abs=1e-4)


def test_a_second_process_on_one_sqlite_data_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with _only_server(data):  # this process serves the folder while the lock is open (as `colaft serve` does)
        out = subprocess.run([sys.executable, "-m", "colaft.app.cli", "serve", "--model", "nothing-loaded",
                              "--data-dir", str(data), "--port", "1"], capture_output=True, text=True, timeout=120,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "another colaft serve uses --data-dir" in lines[0] and "--database-url" in lines[0]
