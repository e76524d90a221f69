"""The backprop baselines (full fine-tuning, the real `peft` package's methods) and `colaft train --method`."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from colaft import ColaModel, Trainer, data, tasks
from colaft.app import baselines
from colaft.app.cli import main
from colaft.tasks import get_task

FIELDS = ["--text-field", "review", "--label-field", "sentiment"]


def test_cola_lowrank_trains_exactly_as_peft_lora(tiny_bert_dir, reviews, tmp_path):
    """ColA low-rank adapters started from a PEFT LoRA adapter follow PEFT's own backprop
    training step for step: same losses, same model after (AdamW, linear schedule, the head too)."""
    job = get_task("sc")
    records = data.load(str(reviews), {"text": "review", "label": "sentiment"}, job.fields, None)
    base = job.load(str(tiny_bert_dir), records, 0)
    batches = list(tasks.loader(job.encode(records, 32), job, 8, shuffle=True, seed=0))
    lora = baselines.build("lora", copy.deepcopy(base), "sc", ["query", "value"], rank=4, alpha=8.0, steps=6)
    torch.manual_seed(1)
    for name, p in lora.net.named_parameters():
        if "lora_B" in name:  # LoRA starts at B = 0; start elsewhere so that A's updates count from step 1
            p.data.normal_(0, 0.2)
    lora.save_pretrained(tmp_path / "init")
    cola = ColaModel.from_peft(copy.deepcopy(base), tmp_path / "init")
    fit = dict(lr=1e-2, scheduler="linear", warmup_ratio=0.2, total_steps=6)
    reference, trainer = baselines.BackpropTrainer(lora, **fit), Trainer(cola, **fit)
    for batch in batches[:6]:
        assert trainer.step(batch) == pytest.approx(reference.step(batch), abs=1e-6)
    assert trainer.lr == pytest.approx(reference.lr)
    lora.eval(), cola.eval()
    with torch.no_grad():
        for batch in batches[6:]:
            torch.testing.assert_close(cola(**batch).logits, lora(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_every_baseline_trains_a_classifier_and_a_causal_lm_through_the_cli(
        method, tiny_bert_dir, tiny_llama_dir, reviews, qa, tmp_path):
    runs = {"sc": ["--model", str(tiny_bert_dir), "--data", str(reviews), *FIELDS],
            "clm": ["--model", str(tiny_llama_dir), "--data", str(qa)]}
    for task, args in runs.items():
        out = tmp_path / task
        assert main(["train", "--task", task, *args, "--method", method, "--batch-size", "8", "--lr", "1e-2",
                     "--max-steps", "4", "--out", str(out)]) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["options"]["method"] == method and run["cola_config"] is None
        assert 0 < run["trainable_parameters"]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert run["after"]["loss"] != run["before"]["loss"]  # it trained
        saved = {p.name for p in (out / "adapters").iterdir()}
        assert ("model.safetensors" in saved) if method == "full" else ("adapter_model.safetensors" in saved)
        assert main(["eval", str(out), "--out", str(tmp_path / f"{task}.json")]) == 0  # the saved model reloads
        again = json.loads((tmp_path / f"{task}.json").read_text())["metrics"]
        assert again["loss"] == pytest.approx(run["after"]["loss"], abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--method", "qlora"], "--method 'qlora': use cola or one of full, lora"),
    (["--method", "lora", "--users", "2"], "--user-field/--users: options of ColA, not of --method lora"),
    (["--method", "full", "--backend", "process", "--interval", "2"], "--backend, --interval: options of ColA"),
    (["--mode", "shared"], "--mode shared needs users"),
])
def test_bad_method_options_are_refused_before_anything_is_written(extra, message, tiny_bert_dir, reviews,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(reviews), *FIELDS, "--max-steps", "2",
                 "--out", str(out), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_peft_methods_need_a_transformers_task(capsys, tmp_path):
    assert main(["train", "--task", "ic", "--method", "lora", "--out", str(tmp_path / "r")]) == 1
    assert "task ic compares ColA with --method full" in capsys.readouterr().err


