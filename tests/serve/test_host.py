"""The pieces under `colaft serve`, without a server: data checks, per-user checkpoints,
base-model rows in mixed batches, per-user flush, chat conversations in the clm task."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import text_batch, tiny_llama

from colaft import ColaConfig, ColaModel, Trainer
from colaft.io.state import load_owner, save_owner
from colaft.serve import files
from colaft.server import server_step
from colaft.tasks import get_task


def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
                     {"role": "assistant", "content": "a bot"}]}


def test_parse_detects_the_format_and_the_labels():
    assert files.parse(lines(CHAT, CHAT))[0] == "chat"
    assert files.parse(lines({"prompt": "p", "completion": "c"}))[0] == "prompt"
    fmt, records, labels = files.parse(lines({"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}) + b"\n\n")
    assert (fmt, len(records), labels) == ("classification", 2, ["neg", "pos"])
    assert files.task_records(fmt, records, labels) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    assert files.task_records("chat", [CHAT]) == [{"question": CHAT["messages"][:2], "answer": "a bot"}]


@pytest.mark.parametrize("data, message", [
    (b'{"text": "a", "label": 1}\n{oops}\n', "line 2: not valid JSON"),
    (lines({"text": "a", "label": 1}, {"text": "", "label": 1}), "line 2: \"text\" must be non-empty"),
    (lines({"text": "a", "label": 1.5}), "line 1: \"label\" must be text or an integer"),
    (lines({"text": "a", "label": 1}, {"text": "b", "label": "x"}), "labels mix text and integers"),
    (lines({"messages": [{"role": "assistant", "content": "hi"}]}), "line 1: no user message"),
    (lines({"messages": "hi"}), "line 1: \"messages\" must be a non-empty list"),
    (lines({"prompt": "p"}), "line 1: \"prompt\" and \"completion\" must both be text"),
    (lines(CHAT, {"prompt": "p", "completion": "c"}), "line 2: a prompt record in a chat file"),
    (b"", "no record"),
])
def test_parse_names_the_broken_line(data, message):
    with pytest.raises(files.DataError, match=message):
        files.parse(data)


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


def test_clm_trains_on_the_last_answer_of_a_conversation(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), [], seed=0)
    record = files.task_records("chat", [CHAT])[0]
    feature = task.encode([record], 64)[0]
    prompt = task.prompt(CHAT["messages"][:2])
    assert prompt.startswith("<|im_start|>system\nbe brief") and prompt.endswith("<|im_start|>assistant\n")
    n_prompt = len(task.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert feature["labels"][:n_prompt] == [-100] * n_prompt
    answer = task.tokenizer.decode([t for t in feature["labels"] if t != -100], skip_special_tokens=True)
    assert answer.strip() == "a bot"


def test_serve_refuses_bad_options_before_loading_anything(capsys, tmp_path):
    from colaft.app.cli import main
    from colaft.serve.commands import parse_model

    assert parse_model("smollm2-135m") == ("smollm2-135m", "smollm2-135m")
    assert parse_model(f"mine={tmp_path}") == ("mine", str(tmp_path))
    assert parse_model(str(tmp_path)) == (tmp_path.name, str(tmp_path))
    for args, message in [(["--backend", "nope"], "unknown backend 'nope'"),
                          (["--backend", "inline", "--workers", "2"], "--workers is an option"),
                          (["--model", "a:b=x"], "an id has no ':'"),
                          (["--model", "x=smollm2-135m", "--model", "x=minilm-l6"], "the same id"),
                          (["--num-labels", "1"], "--num-labels >= 2")]:
        assert main(["serve", "--data-dir", str(tmp_path / "d"), *args]) == 1
        assert message in capsys.readouterr().err
    assert main(["users", "remove", "x", "--data-dir", str(tmp_path / "d")]) == 1
    assert "unknown action" in capsys.readouterr().err


def test_the_database_keeps_no_nan_and_cuts_long_messages(tmp_path):
    """A diverged loss (NaN) is stored as null (PostgreSQL's JSON, and the API's, have no NaN);
    an event message past its column's length is cut, not refused by PostgreSQL."""
    from colaft.serve.db import MESSAGE_CHARS, Database, Event, Job, User

    db = Database(f"sqlite:///{tmp_path / 'colaft.db'}")
    try:
        with db.session() as s:
            s.add(User(id="user-1", name="u", key_hash="0" * 64))
            s.flush()  # the rows no relationship orders: each before the one that points at it
            s.add(Job(id="ftjob-1", user_id="user-1", model="m", training_file="file-1", hyperparameters={},
                      options={}, seed=0, status="running"))
            s.flush()
            db.add_event(s, "ftjob-1", "x" * (MESSAGE_CHARS + 10), type="metrics",
                         data={"train_loss": float("nan"), "more": [float("inf"), 1.5]})
        with db.read() as s:
            event = s.query(Event).one()
        assert len(event.message) == MESSAGE_CHARS and event.message.endswith("...")
        assert event.data == {"train_loss": None, "more": [None, 1.5]}
    finally:
        db.close()


def test_unused_finished_adapters_are_unloaded_and_come_back_the_same(tmp_path, tiny_llama_dir):
    """With max_loaded_adapters=2, four finished jobs keep at most two adapter sets loaded (least
    recently used out); an unloaded job's adapters reload from disk equal, answering the same."""
    from tiny_models import QA

    from colaft.serve.db import Database, File, Job, User
    from colaft.serve.inference import Request
    from colaft.serve.scheduler import Engine
    from colaft.serve.settings import Settings
    from colaft.serve.schemas import ColaftOptions

    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (data / "files" / "file-1").write_bytes(lines(*records))
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
