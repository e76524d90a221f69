"""A fault fails only the job it is blamed on (colaft.serve.isolation, through the engine).

The engine runs in this process (its thread is not started: the tests call `_admit` and `_tick`
as its loop does), on a tiny Llama, with jobs written straight to the database. Each run with a
faulty job is compared with the same jobs run without it on a fresh engine: the innocent jobs
must take every step once and end with the same adapters.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_helpers import jsonl
from tiny_models import QA

import colaft.trainer
from colaft.serve import isolation
from colaft.serve.db import Database, Event, File, Job, User
from colaft.serve.jobs import step_groups
from colaft.serve.scheduler import Engine
from colaft.serve.schemas import ColaftOptions
from colaft.serve.settings import Settings

HYPER = {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 50}  # 4 rows: 4 steps


class Jobs:
    """An engine of the tiny Llama and its database, with jobs added straight to it."""

    def __init__(self, folder: Path, model_dir: Path, **settings):
        data = folder / "data"
        (data / "files").mkdir(parents=True)
        records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
        (data / "files" / "file-1").write_bytes(jsonl(records))
        self.db = Database(f"sqlite:///{data / 'colaft.db'}")
        self.engine = Engine("llama", str(model_dir), "clm", self.db, Settings(data_dir=data, **settings))
        self.options = {**ColaftOptions(max_length=64).model_dump(), "targets": self.engine.host.task.recipe.targets}
        with self.db.session() as s:
            s.add(User(id="user-1", name="u", key_hash="0" * 64))
            s.flush()
            s.add(File(id="file-1", user_id="user-1", filename="chat.jsonl", purpose="fine-tune", bytes=1,
                       format="chat", rows=len(records)))

    def run(self, jobs: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
        """Admit `jobs` (id -> its colaft options over the defaults) in order, tick until none runs;
        the adapters of the jobs that succeeded."""
        with self.db.session() as s:
            for job_id, options in jobs.items():  # a job's seed is its own, wherever it comes
                s.add(Job(id=job_id, user_id="user-1", model="llama", training_file="file-1",
                          seed=sum(map(ord, job_id)), status="queued", hyperparameters=HYPER,
                          options={**self.options, **options}))
        for job_id in jobs:
            self.engine._admit(job_id)
        ticks = 0
        while self.engine.runs:
            self.engine._tick()
            ticks += 1
            assert ticks < 100
        cola = self.engine.host.cola
        return {j: {f"{site}.{k}": v.clone() for site, a in cola.user_adapters(j).items()
                    for k, v in a.state_dict().items()}
                for j in jobs if self.job(j).status == "succeeded"}

    def job(self, job_id: str) -> Job:
        with self.db.read() as s:
            return s.get(Job, job_id)

    def events(self, job_id: str) -> list[Event]:
        with self.db.read() as s:
            return list(s.query(Event).filter(Event.job_id == job_id).order_by(Event.seq))

    def steps(self, job_id: str) -> list[int]:
        return [e.data["step"] for e in self.events(job_id) if e.type == "metrics"]

    def close(self) -> None:
        self.engine._shutdown()
        self.db.close()


@pytest.fixture
def engines(tmp_path, tiny_llama_dir):
    made = []

    def make(**settings) -> Jobs:
        made.append(Jobs(tmp_path / str(len(made)), tiny_llama_dir, **settings))
        return made[-1]
    yield make
    for jobs in made:
        jobs.close()


def _assert_innocent(jobs: Jobs, got: dict, want: dict, exact: bool) -> None:
    assert got.keys() == want.keys() and len(want) >= 2
    for job_id in want:
        assert jobs.steps(job_id) == [1, 2, 3, 4]  # every step once: none skipped, none repeated
        for k in want[job_id]:
            if exact:
                assert torch.equal(got[job_id][k], want[job_id][k]), (job_id, k)
            else:
                torch.testing.assert_close(got[job_id][k], want[job_id][k], rtol=1e-6, atol=1e-8)
        # it trained: lowrank's lora_B and linear's weight start at zero
        assert any(float(t.abs().max()) > 0 for k, t in got[job_id].items() if "lora_A" not in k)


def test_a_job_whose_fit_fails_fails_alone_and_the_others_train_as_without_it(engines):
    """Three jobs in every batch; the first's fit device cannot hold its adapters' weights (the
    "meta" device: refused when a job is created, so written straight to the database here, as a
    device that went away would be). It fails at its first step with an event that says why; the
    other two take each of their steps once and end as they do when it never existed.

    Round-off tolerance (1e-6 relative), not equality: their first step's batch still held the
    faulty job's rows, so the batch was padded and multiplied at another size (on a CPU the
    adapters come out equal, but no kernel promises that for every batch size)."""
    faulty = engines()
    got = faulty.run({"ftjob-x": {"fit_device": "meta"}, "ftjob-a": {}, "ftjob-b": {"adapter": "linear"}})
    x = faulty.job("ftjob-x")
    assert x.status == "failed" and x.error["code"] == "fit_failed", x.error
    assert "meta" in x.error["message"] and faulty.steps("ftjob-x") == []
    assert any(e.level == "error" and "fit" in e.message for e in faulty.events("ftjob-x"))
    want = engines().run({"ftjob-a": {}, "ftjob-b": {"adapter": "linear"}})
    _assert_innocent(faulty, got, want, exact=False)


def test_a_fault_in_the_shared_step_is_blamed_on_its_job_by_bisection(engines, monkeypatch):
    """The server step raises whenever job x's rows are in the batch: the engine bisects the
    batch by job (without applying anything), fails x alone, and steps the other three again
    from the same state, together, as they step without x: equal adapters, bit for bit."""
    server_step = colaft.trainer.server_step

    def breaks_on_x(model, batch, loss_fn=None, users=None, *options):
        if "ftjob-x" in (users if users is not None else batch["users"]):
            raise RuntimeError("index out of range in self")
        return server_step(model, batch, loss_fn, users, *options)

    faulty = engines()
    monkeypatch.setattr(colaft.trainer, "server_step", breaks_on_x)
    got = faulty.run({"ftjob-a": {}, "ftjob-b": {}, "ftjob-x": {}, "ftjob-c": {"adapter": "linear"}})
    monkeypatch.undo()
    x = faulty.job("ftjob-x")
    assert x.status == "failed" and x.error["code"] == "training_failed", x.error
    assert "RuntimeError: index out of range in self" in x.error["message"]
    want = engines().run({"ftjob-a": {}, "ftjob-b": {}, "ftjob-c": {"adapter": "linear"}})
    _assert_innocent(faulty, got, want, exact=True)


def test_non_finite_weights_fail_their_job_alone(engines, monkeypatch):
    """An update whose weights are not finite fails its job; the other job trains on."""
    from colaft.users import Owner
    flush = Owner.flush

    def poisoned(self):
        update = flush(self)
        if self.user == "ftjob-x" and update is not None and update.states:
            next(iter(next(iter(update.states.values())).values())).fill_(float("inf"))
        return update

    monkeypatch.setattr(Owner, "flush", poisoned)
    jobs = engines()
    got = jobs.run({"ftjob-x": {}, "ftjob-a": {}})
    x = jobs.job("ftjob-x")
    assert x.status == "failed" and x.error["code"] == "fit_failed" and "finite" in x.error["message"], x.error
    assert list(got) == ["ftjob-a"] and jobs.steps("ftjob-a") == [1, 2, 3, 4]


# ---------------------------------------------------------------- the bisection alone

class _Run:
    def __init__(self, job_id: str):
        self.job_id = job_id

    def __repr__(self) -> str:
        return self.job_id


def _fails_with(*bad: str):
    def check(runs) -> None:
        if any(r.job_id in bad for r in runs):
            raise ValueError("bad rows of " + ", ".join(r.job_id for r in runs if r.job_id in bad))
    return check


def test_bisection_blames_exactly_the_jobs_whose_rows_make_the_step_fail():
    runs = [_Run(f"j{i}") for i in range(8)]
    calls = []

    def check(rs):
        calls.append([r.job_id for r in rs])
        _fails_with("j2", "j5")(rs)
    blamed, retries = isolation.blame(runs, ValueError("the whole batch"), check)
    assert sorted(blamed) == ["j2", "j5"] and "ValueError: bad rows of j2" in blamed["j2"]
    assert [[r.job_id for r in group] for group in retries] == [["j0", "j1", "j3", "j4", "j6", "j7"]]
    assert len(calls) < 8 + 4  # halves, not every job alone and every pair

    # one job: itself, with the step's own error
    blamed, retries = isolation.blame(runs[:1], RuntimeError("boom"), _fails_with("j0"))
    assert blamed == {"j0": "RuntimeError: boom"} and retries == []

    # a fault that no half hits alone (the batch's size, say): nobody is blamed, the halves step apart
    blamed, retries = isolation.blame(runs[:5], MemoryError(), lambda rs: None)
    assert blamed == {} and [[r.job_id for r in g] for g in retries] == [["j0", "j1"], ["j2", "j3", "j4"]]


def test_why_is_short_and_one_line():
    why = isolation.why(RuntimeError("line one\nline two " + "x" * 1000))
    assert why.startswith("RuntimeError: line one") and "\n" not in why and len(why) <= 300


# ---------------------------------------------------------------- steps of bounded size

def test_many_jobs_take_several_steps_of_at_most_the_token_cap_and_train_as_in_one(engines, monkeypatch):
    """With --max-step-tokens, four jobs' rows are stepped in batches of at most the cap (padded
    tokens), not in one batch that grows with the number of jobs. Each job still takes each of its
    steps once, and ends with the adapters it gets when all four share every batch."""
    jobs = {"ftjob-a": {}, "ftjob-b": {}, "ftjob-c": {"adapter": "linear"}, "ftjob-d": {}}
    want = engines(max_step_tokens=0).run(jobs)
    split = engines(max_step_tokens=200)  # a batch of 3 rows is ~100-130 padded tokens: one job a step
    shapes = []
    step = split.engine.host.step

    def recorded(batch, mode):
        shapes.append((len(set(batch["users"])), tuple(batch["input_ids"].shape)))
        return step(batch, mode)
    monkeypatch.setattr(split.engine.host, "step", recorded)
    got = split.run(jobs)
    assert all(rows * width <= 200 for n, (rows, width) in shapes if n > 1), shapes
    assert max(n for n, _ in shapes) < 4 and len(shapes) > 4, shapes  # never all four at once
    assert got.keys() == want.keys() == jobs.keys()
    for job_id in jobs:
        assert split.steps(job_id) == [1, 2, 3, 4]
        for k, w in want[job_id].items():  # round-off: the batches are padded to other lengths (and
            # Adam's steps turn a near-zero gradient's round-off into a step of its size): norm-wise
            assert float((got[job_id][k] - w).norm()) <= 1e-5 * float(w.norm()), (job_id, k)
        assert any(float(t.abs().max()) > 0 for k, t in got[job_id].items() if "lora_A" not in k)


def test_step_groups_pack_whole_jobs_under_the_cap():
    class R:
        def __init__(self, job_id):
            self.job_id = job_id
    lengths = {"a": [10, 12], "b": [30], "c": [11, 11, 11], "d": [500], "e": [9]}
    runs = [R(j) for j in lengths]
    rows = {j: [{"input_ids": [0] * n} for n in ns] for j, ns in lengths.items()}
    groups = step_groups(runs, rows, 64)
    ids = [[r.job_id for r in g] for g in groups]
    assert sorted(j for g in ids for j in g) == sorted(lengths)  # every job once, none split
    for g in groups:
        padded = sum(len(rows[r.job_id]) for r in g) * max(len(f["input_ids"]) for r in g for f in rows[r.job_id])
        assert padded <= 64 or len(g) == 1, ids
    assert ["d"] in ids  # past the cap alone: a step of its own
    # by length: e and c (4 rows of at most 11: 44 tokens); a would make 6 x 12 = 72
    assert ids == [["a"], ["b"], ["c", "e"], ["d"]]  # each batch, and the batches, in the jobs' order
    assert step_groups(runs, rows, 0) == [runs] and step_groups([], rows, 64) == []
