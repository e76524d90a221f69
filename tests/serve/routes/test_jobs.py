"""Job creation (colaft.serve.routes.jobs): options that would only fail once the job trains are
refused when it is created, with a 400 naming the field, and nothing is created."""
from __future__ import annotations

import pytest
import torch
from serve_helpers import CHAT, upload


@pytest.mark.parametrize("device", ["meta", "cuda:99", "mps", "xpu:0", "cpu:nope"])
def test_a_fit_device_this_server_cannot_use_is_refused_at_create(server, alice, device):
    f = upload(alice, CHAT)
    with server.http(server.keys["alice"]) as h:
        before = h.get("/v1/fine_tuning/jobs").json()["data"]
        r = h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": f.id,
                                                 "colaft": {"fit_device": device}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "colaft.fit_device" and "fit_device" in error["message"], error
        assert h.get("/v1/fine_tuning/jobs").json()["data"] == before


def test_a_usable_fit_device_is_accepted(server, alice):
    f = upload(alice, CHAT)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 1},
                                        extra_body={"colaft": {"fit_device": device}})
    assert job.model_extra["colaft"]["fit_device"] == device
    alice.fine_tuning.jobs.cancel(job.id)
