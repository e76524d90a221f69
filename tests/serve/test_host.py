"""The model host (colaft.serve.host) and the library pieces it stands on: per-user owner
checkpoints, base-model rows in mixed batches, per-user flush, finished adapters unloaded
least recently used first and loaded again the same.
"""
from __future__ import annotations

import pytest
import torch
from conftest import text_batch, tiny_llama
from serve_helpers import jsonl

from colaft import ColaConfig, ColaModel, Trainer
from colaft.io.state import load_owner, save_owner
from colaft.server import server_step


def _trainer(interval: int = 2) -> tuple[ColaModel, Trainer]:
    model = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj", "v_proj"]), user="a")
    trainer = Trainer(model, lr=1e-2, interval=interval)
    trainer.add_user("b", lr=1e-2, interval=interval)
    return model, trainer


def _state(model: ColaModel, user: str) -> dict:
    return {f"{s}.{k}": v.clone() for s, a in model.user_adapters(user).items() for k, v in a.state_dict().items()}


def test_save_owner_resumes_one_user_exactly_among_others(tmp_path):
    batch, users = text_batch(0), ["a", "b", "a", "b"]
    model, trainer = _trainer()
    for _ in range(3):  # a partial interval is pending for both users
        trainer.step(batch, users=users)
    save_owner(trainer, "b", tmp_path / "b")
    for _ in range(3):
        trainer.step(batch, users=users)
    # a fresh trainer whose other user has a different history: b's training goes on as before
    model2, trainer2 = _trainer()
    load_owner(trainer2, "b", tmp_path / "b")
    for _ in range(3):
        trainer2.step(batch, users=users)
    want, got = _state(model, "b"), _state(model2, "b")
    assert all(torch.equal(got[k], want[k]) for k in want)
    # also an adapter checkpoint
    assert ColaModel.from_pretrained(tiny_llama(), tmp_path / "b", user="b").users == ["b"]
    with pytest.raises(ValueError, match="fits every 1"):
        load_owner(_trainer(interval=1)[1], "b", tmp_path / "b")


def test_rows_without_a_user_run_through_the_base_model():
    base = tiny_llama()
    reference = base(**text_batch(1)).logits
    model, trainer = _trainer(interval=1)
    trainer.step(text_batch(0), users=["a", "b", "a", "b"])  # the adapters are no longer zero
    model.eval()
    with torch.no_grad():
        mixed = model(**text_batch(1), users=[None, "a", None, "b"]).logits
        alone_a = model(**text_batch(1), users=["a"] * 4).logits
        only_base = model(**text_batch(1), users=[None] * 4).logits
    torch.testing.assert_close(mixed[[0, 2]], reference[[0, 2]])
    torch.testing.assert_close(only_base, reference)
    torch.testing.assert_close(mixed[1], alone_a[1])
    assert not torch.allclose(alone_a[1], reference[1])
    with pytest.raises(ValueError, match="every training row needs a user"):
        server_step(model, text_batch(0), users=["a", None, "a", "b"])


def test_flush_of_some_users_leaves_the_others_pending():
    model, trainer = _trainer(interval=2)
    trainer.step(text_batch(0), users=["a", "b", "a", "b"])
    before = _state(model, "b")
    trainer.flush(["a"])
    assert trainer.owner_state("a")["version"] == 1 and trainer.owner_state("a")["pending_steps"] == 0
    assert trainer.owner_state("b")["version"] == 0 and trainer.owner_state("b")["pending_steps"] == 1
    assert all(torch.equal(v, before[k]) for k, v in _state(model, "b").items())


def test_unused_finished_adapters_are_unloaded_and_come_back_the_same(tmp_path, tiny_llama_dir):
    """With max_loaded_adapters=2, four finished jobs keep at most two adapter sets loaded (least
    recently used out); an unloaded job's adapters reload from disk equal, answering the same."""
    from tiny_models import QA

    from colaft.serve.db import Database, File, Job, User
    from colaft.serve.inference import Request
    from colaft.serve.scheduler import Engine
    from colaft.serve.schemas import ColaftOptions
    from colaft.serve.settings import Settings

    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (data / "files" / "file-1").write_bytes(jsonl(records))
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    engine = Engine("llama", str(tiny_llama_dir), "clm", db, Settings(data_dir=data, max_loaded_adapters=2))
    options = {**ColaftOptions(max_length=64).model_dump(), "targets": engine.host.task.recipe.targets}
    jobs = [f"ftjob-{i}" for i in range(4)]
    with db.session() as s:
        s.add(User(id="user-1", name="u", key_hash="0" * 64))
        s.flush()
        s.add(File(id="file-1", user_id="user-1", filename="chat.jsonl", purpose="fine-tune", bytes=1,
                   format="chat", rows=len(records)))
        for i, job_id in enumerate(jobs):
            s.add(Job(id=job_id, user_id="user-1", model="llama", training_file="file-1", seed=i, status="queued",
                      hyperparameters={"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 50},
                      options=options))
    try:
        for job_id in jobs:  # all four train in the same batches and finish at the same step
            engine._admit(job_id)
        while engine.runs:
            engine._tick()
        with db.read() as s:
            assert [s.get(Job, j).status for j in jobs] == ["succeeded"] * 4

        def loaded() -> list[str]:
            assert set(engine.host.cola.users) == set(engine.host.finished)  # nothing else holds adapters
            return list(engine.host.finished)

        def ask(job_id: str) -> str:
            future = engine.infer(Request(job_id, "personal", messages=[{"role": "user", "content": "who are you"}],
                                          max_tokens=6))
            engine._serve()  # what the engine's thread does between steps
            assert len(loaded()) <= 2
            return future.result(timeout=0).text

        def weights(job_id: str) -> dict:
            return {f"{site}.{k}": v.clone() for site, a in engine.host.cola.user_adapters(job_id).items()
                    for k, v in a.state_dict().items()}

        assert loaded() == jobs[2:]  # the first two finished were unloaded at once
        first = {j: (ask(j), weights(j)) for j in jobs[2:]}
        assert ask(jobs[0]) and loaded() == [jobs[3], jobs[0]]  # job 2, least recently used, is out
        ask(jobs[1])
        assert loaded() == [jobs[0], jobs[1]]
        for j in jobs[2:]:
            assert ask(j) == first[j][0]
            again = weights(j)
            assert again.keys() == first[j][1].keys() and all(torch.equal(again[k], first[j][1][k]) for k in again)
        assert loaded() == jobs[2:]
    finally:
        engine._shutdown()
        db.close()


CONFIG = ColaConfig(target_modules=["q_proj", "v_proj"])
FIT = {"optimizer": "adamw", "lr": 1e-2, "scheduler": "linear", "total_steps": 4, "interval": 2}


def _host(tmp_path, tiny_llama_dir, **settings):
    from colaft.serve.host import ModelHost
    from colaft.serve.settings import Settings

    return ModelHost("llama", str(tiny_llama_dir), "clm", Settings(data_dir=tmp_path, **settings))


def test_a_client_job_is_sent_bfloat16_packets_with_one_x_per_input(tmp_path, tiny_llama_dir):
    """--transfer-dtype bfloat16: a fit client's packets are cast for the transfer, q and v still
    sharing one x (sent once in the safetensors body the client pulls), and the client fits from them."""
    from colaft.packets import packets_from_bytes, packets_nbytes, packets_to_bytes

    host = _host(tmp_path, tiny_llama_dir, transfer_dtype="bfloat16")
    pushed = []
    owner = host.add_client_job("c", "personal", CONFIG, {**FIT, "interval": 1}, None, sink=pushed.append)
    try:
        # every token trains (a chat batch's ignored prompt rows are kept by v_proj, whose dL/dh
        # is not zero there, and dropped by the last q_proj: those two keep their own rows)
        host.step({**text_batch(0), "users": ["c"] * 4}, "personal")
        packets = packets_from_bytes(packets_to_bytes(pushed[0]))  # as the client receives them
        assert host.trainer.stats["packet_bytes"] == packets_nbytes(packets)
        assert all(p.x.dtype == p.grad.dtype == torch.bfloat16 for p in packets)
        x = {p.site.rsplit(".", 1)[0]: [] for p in packets}
        for p in packets:
            x[p.site.rsplit(".", 1)[0]].append(p.x)
        assert all(len(xs) == 2 and xs[0] is xs[1] for xs in x.values())  # q_proj and v_proj: one x
        update = owner.push(packets)  # one fit from the shared x
        assert update is not None and all(s["lora_B.weight"].abs().max() > 0 for s in update.states.values())
    finally:
        host.close()


def _batch(host, user: str, rows: int = 2) -> dict:
    records = [{"question": [{"role": "user", "content": q}], "answer": a} for q, a in [("hi", "hello")] * rows]
    return host.task.collate([{**f, "user": user} for f in host.task.encode(records, 32)])


def test_the_first_job_makes_the_model_and_trainer_however_it_comes_and_the_next_ones_join_them(
        tmp_path, tiny_llama_dir):
    """A finished job's saved adapters, a server-fit job or a client-fit job: whichever comes
    first makes the host's ColaModel and Trainer (with its adapters and owner), once; its fit
    settings stay its own."""
    trained = _host(tmp_path, tiny_llama_dir)
    trained.add_job("done", "personal", CONFIG, FIT, ["pos", "neg"])
    for adapter in trained.cola.user_adapters("done").values():
        for p in adapter.parameters():
            torch.nn.init.normal_(p)  # weights no fresh adapter has
    trained.save_adapters("done", tmp_path / "done")
    want = _state(trained.cola, "done")
    trained.close()

    host = _host(tmp_path, tiny_llama_dir)
    assert host.cola is None and host.trainer is None and host.model(["x"]) == (host.base, {})
    host.load_finished("done", "personal", CONFIG, tmp_path / "done" / "adapter", ["pos", "neg"])
    cola, trainer = host.cola, host.trainer
    assert cola.users == ["done"] and trainer is not None and host.labels["done"] == ["pos", "neg"]
    got = _state(cola, "done")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # the saved weights
    host.add_job("a", "personal", CONFIG, FIT, None)
    owner = host.add_client_job("c", "collaborative", CONFIG, FIT, None, sink=lambda packets: None)
    assert (host.cola, host.trainer) == (cola, trainer) and cola.users == ["done", "a", "c"]
    assert (trainer.user_fit["a"].lr, trainer.user_fit["a"].interval) == (1e-2, 2) and "a" in trainer.pipeline.tracks
    assert owner.user == "c" and "c" in trainer.remote and "c" not in trainer.pipeline.tracks
    assert list(host.finished) == ["done"] and host.modes == {"done": "personal", "a": "personal", "c": "collaborative"}
    host.close()

    client_first = _host(tmp_path, tiny_llama_dir)
    pushed = []
    client_first.add_client_job("c", "personal", CONFIG, FIT, None, sink=pushed.append)
    trainer = client_first.trainer
    assert client_first.cola.users == ["c"] and trainer.user_fit["c"].lr == 1e-2  # its own fit, not the defaults
    assert "c" in trainer.remote and "c" not in trainer.pipeline.tracks  # the owner the Trainer gave it is gone
    losses, _, faults = client_first.step(_batch(client_first, "c"), "personal")
    assert set(losses) == {"c"} and not faults and len(pushed) == 1 and pushed[0]  # its packets went to its sink
    client_first.close()

    server_first = _host(tmp_path, tiny_llama_dir)
    server_first.add_job("a", "personal", CONFIG, FIT, None)
    assert server_first.cola.users == ["a"] and "a" in server_first.trainer.pipeline.tracks
    fit = server_first.trainer.owner("a").config
    assert (fit.lr, fit.interval) == (1e-2, 2) and server_first.trainer.fit_config.lr != 1e-2  # the job's, alone
    server_first.close()


def test_finished_adapters_that_do_not_fit_leave_nothing_behind(tmp_path, tiny_llama_dir):
    saved = _host(tmp_path, tiny_llama_dir)
    saved.add_job("done", "personal", CONFIG, FIT, None)
    saved.save_adapters("done", tmp_path / "done")
    saved.close()
    host = _host(tmp_path, tiny_llama_dir)
    other = ColaConfig(target_modules=["q_proj", "v_proj"], rank=2)  # the job's options say another rank
    with pytest.raises(ValueError, match="another ColaConfig"):
        host.load_finished("done", "personal", other, tmp_path / "done" / "adapter", None)
    assert not host.holds("done") and host.modes == {} and host.finished == {}
    host.load_finished("done", "personal", CONFIG, tmp_path / "done" / "adapter", None)  # the model is still usable
    assert host.cola.users == ["done"]
    host.remove("done")
    assert not host.holds("done") and host.modes == {} and host.labels == {} and host.finished == {}
    host.close()


def test_each_job_fits_with_its_own_settings_whichever_came_first(tmp_path, tiny_llama_dir):
    """The first job makes the Trainer, but its fit settings are its own, not every later job's
    defaults: a second job that names no fit_device fits where the server's adapters are."""
    host = _host(tmp_path, tiny_llama_dir)
    host.add_job("first", "personal", CONFIG, {**FIT, "fit_device": "cpu", "lr": 2e-2}, None)
    host.add_job("second", "personal", CONFIG, FIT, None)
    first, second = (host.trainer.owner(job).config for job in ("first", "second"))
    assert (first.device, first.lr) == ("cpu", 2e-2)
    assert (second.device, second.lr) == (None, 1e-2)
    host.close()
