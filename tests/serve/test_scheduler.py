"""The engine's scheduling (colaft.serve.scheduler), through the real server: jobs of two users in
one batch, collaborative and personal batches side by side, a cancel between two steps, and a
restart after SIGKILL that resumes from the checkpoints.

Tiny random models (tiny_models.py) keep a job to a second or two. The shared server is
conftest.py's; its users and the waiting are in serve_helpers.py.
"""
from __future__ import annotations

import io
import signal
import time
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_helpers import CHAT, Server, add_user, jsonl, upload, wait_for, wait_job


def test_two_users_train_concurrently_on_one_base_model(server, alice, bob, tiny_llama_dir, tmp_path):
    fa, fb = upload(alice, CHAT, "alice.jsonl"), upload(bob, CHAT[::-1], "bob.jsonl")
    assert (fa.purpose, fa.status, fa.bytes) == ("fine-tune", "processed", len(jsonl(CHAT)))
    hyper = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 5}
    # bob's job is running (and longer) when alice's starts: all of alice's steps share bob's batches
    jb = bob.fine_tuning.jobs.create(model="llama", training_file=fb.id, seed=3,
                                     method={"type": "supervised", "supervised": {"hyperparameters": {
                                         **hyper, "n_epochs": 40}}},
                                     extra_body={"colaft": {"adapter": "linear", "targets": ["q_proj", "o_proj"]}})
    wait_job(bob, jb.id, 60, until=("running",))
    ja = alice.fine_tuning.jobs.create(model="llama", training_file=fa.id, hyperparameters=hyper, seed=7)
    assert ja.status == "queued" and ja.hyperparameters.n_epochs == 4 and ja.hyperparameters.batch_size == 4
    ja, jb = wait_job(alice, ja.id), wait_job(bob, jb.id)
    assert (ja.status, jb.status) == ("succeeded", "succeeded"), (ja.error, jb.error)
    assert ja.fine_tuned_model == f"ft:llama:{ja.id}" and ja.trained_tokens > 0 and ja.finished_at
    # one server step for both jobs: the engine logs the jobs per step (no ids, no data)
    assert " 2 jobs, 8 rows, personal mode" in server.log_text()

    events = list(alice.fine_tuning.jobs.list_events(ja.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics][::-1] == list(range(1, 13))  # newest first
    assert events[0].message == "The job has successfully completed"
    assert all(isinstance(e.data["train_loss"], float) for e in metrics)
    checkpoints = list(alice.fine_tuning.jobs.checkpoints.list(ja.id))
    assert [c.step_number for c in checkpoints] == [12, 9, 6]  # the last three epochs, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{ja.fine_tuned_model}:ckpt-step-12"
    results = alice.files.content(ja.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss" and len(results) == 13
    assert {m.id for m in alice.models.list()} >= {"llama", "bert", ja.fine_tuned_model}
    assert jb.fine_tuned_model not in {m.id for m in alice.models.list()}

    # The same job trained alone on the idle server ends with the same adapter: sharing
    # batches with bob's job changed nothing for alice's.
    again = alice.fine_tuning.jobs.create(model="llama", training_file=fa.id, hyperparameters=hyper, seed=7)
    assert wait_job(alice, again.id).status == "succeeded"
    with server.http(server.keys["alice"]) as h:
        mixed, alone = (_load_zip(h.get(f"/v1/fine_tuning/jobs/{j}/adapter?format=colaft"), tmp_path / j)
                        for j in (ja.id, again.id))
    from safetensors.torch import load_file
    a, b = load_file(mixed / "adapters.safetensors"), load_file(alone / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert all(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # trained away from B = 0

    # The PEFT adapter loads in peft and answers as the server does.
    with server.http(server.keys["alice"]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{ja.id}/adapter")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        peft_dir = _load_zip(r, tmp_path / "peft")
        assert (peft_dir / "adapter_config.json").is_file()
        assert h.get(f"/v1/fine_tuning/jobs/{jb.id}/adapter").status_code == 404  # bob's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft_dir).eval()
    question = "who are you"
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    answer = alice.chat.completions.create(model=ja.fine_tuned_model, max_tokens=6,
                                           messages=[{"role": "user", "content": question}])
    assert answer.choices[0].message.content == tok.decode(out, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == ids.shape[1] and answer.usage.completion_tokens == len(out)


def _load_zip(response: httpx.Response, folder: Path) -> Path:
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(folder)
    return folder


def test_collaborative_jobs_train_beside_personal_ones(server, alice, bob):
    """Collaborative jobs share a batch in collaborative mode; a personal job trains in its own batch meanwhile."""
    f = upload(alice, CHAT)
    g = upload(bob, CHAT)
    hyper = {"n_epochs": 3, "batch_size": 4}
    first = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={**hyper, "n_epochs": 30},
                                          extra_body={"colaft": {"mode": "collaborative"}})
    wait_job(alice, first.id, 60, until=("running",))  # still running while bob's jobs train
    jobs = [(alice, first),
            (bob, bob.fine_tuning.jobs.create(model="llama", training_file=g.id, hyperparameters=hyper,
                                               extra_body={"colaft": {"mode": "collaborative", "adapter": "linear"}})),
            (bob, bob.fine_tuning.jobs.create(model="llama", training_file=g.id, hyperparameters=hyper))]
    done = [wait_job(c, j.id) for c, j in jobs]
    assert [j.status for j in done] == ["succeeded"] * 3, [j.error for j in done]
    assert done[0].model_extra["colaft"]["mode"] == "collaborative"
    log = server.log_text()
    assert " 2 jobs, 8 rows, collaborative mode" in log and " 1 jobs, 4 rows, personal mode" in log
    for client, job in zip((alice, bob, bob), done):
        answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                                messages=[{"role": "user", "content": "who are you"}])
        assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:  # an mlp delta cannot be averaged
        alice.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                      extra_body={"colaft": {"mode": "collaborative", "adapter": "mlp"}})
    assert "mergeable" in str(e.value)


def test_cancel_and_deleting_a_file_in_use(server, alice):
    f = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                        hyperparameters={"n_epochs": 50, "batch_size": 1})  # 600 steps
    wait_job(alice, job.id, 60, until=("running",))
    with pytest.raises(openai.ConflictError) as e:
        alice.files.delete(f.id)
    assert job.id in str(e.value)
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    time.sleep(1.0)  # the engine drops the job at its next tick
    steps = len([e for e in alice.fine_tuning.jobs.list_events(job.id, limit=10000) if e.type == "metrics"])
    time.sleep(1.0)
    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=10000))
    assert len([e for e in events if e.type == "metrics"]) == steps < 1500  # no step after the cancel
    assert events[0].message == "Fine-tuning job cancelled"
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        alice.fine_tuning.jobs.cancel(job.id)
    assert alice.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)


def test_restart_after_sigkill_resumes_and_loses_nothing(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    key = add_user(data, "dana")
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--checkpoint-every", "5").start()
    try:
        client = srv.client(key)
        f = upload(client, CHAT)
        done = wait_job(client, client.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                                               hyperparameters={"n_epochs": 2}).id)
        done_events = [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)]
        answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                                messages=[{"role": "user", "content": "who are you"}])
        long = client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 50})
        # killed once the job has a checkpoint past its first
        wait_for(lambda: any(e.message.startswith("Step 12/") for e in
                             client.fine_tuning.jobs.list_events(long.id, limit=30).data), 120)
        before = [e.id for e in client.fine_tuning.jobs.list_events(long.id, limit=10000)]
        srv.stop(signal.SIGKILL)

        client = srv.start().client(key)  # a new port
        assert {x.id for x in client.files.list()} == {f.id, *done.result_files}
        again = client.fine_tuning.jobs.retrieve(done.id)
        assert again.status == "succeeded" and again.fine_tuned_model == done.fine_tuned_model
        assert [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)] == done_events
        assert client.chat.completions.create(
            model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "who are you"}]
        ).choices[0].message.content == answer.choices[0].message.content  # its adapters came back from disk
        finished = wait_job(client, long.id, 240)
        assert finished.status == "succeeded", finished.error
        events = list(client.fine_tuning.jobs.list_events(long.id, limit=10000))
        assert set(before) <= {e.id for e in events}  # no event lost
        resumed = [e.message for e in events if e.message.startswith("Resumed from the checkpoint at step")]
        assert len(resumed) == 1
        step = int(resumed[0].split("step ")[1].split()[0])
        assert step >= 10  # the newest checkpoint before the kill (every 5 steps), not the start
        oldest_first = events[::-1]
        resumed_at = [e.message for e in oldest_first].index(resumed[0])
        total = 50 * 2  # 12 rows in batches of 8
        assert [e.data["step"] for e in oldest_first[resumed_at:] if e.type == "metrics"] == \
            list(range(step + 1, total + 1))
    finally:
        srv.stop()


def test_a_burst_of_new_jobs_starts_one_a_turn_between_the_running_jobs_steps():
    """Starting a job tokenises its data in the engine's thread: 64 jobs created at once used to
    start all before the next step, and the running jobs stood still meanwhile (a step in 15 s
    under `colaft bench serve --abuse`). Now each turn of the engine starts one, then steps."""
    import queue
    from types import SimpleNamespace

    from colaft.serve.scheduler import Engine

    started, failed = [], []
    engine = SimpleNamespace(_admits=queue.Queue(), _admit=started.append, id="m",
                             _fail=lambda job, *why: failed.append(job))
    for job in ("a", "b", "c"):
        engine._admits.put(job)
    turns = [Engine._take_admit(engine) for _ in range(4)]
    assert started == ["a", "b", "c"] and turns == [True, True, False, False] and not failed

    def broken(job):
        raise RuntimeError("boom")

    engine._admit = broken  # a job that cannot start fails alone; the next one still starts
    engine._admits.put("d")
    engine._admits.put("e")
    assert Engine._take_admit(engine) is True and failed == ["d"]
