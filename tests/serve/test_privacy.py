"""What `colaft serve` keeps private, with the real server: every folder under --data-dir 0700
and every file 0600 (an older, world-readable data folder tightened at start), and no API key
in its log, even one a client put in a URL."""
from __future__ import annotations

import os
import stat

from serve_helpers import CHAT, Server, add_user, upload, wait_job


def test_data_dir_is_private_and_no_key_is_logged(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    key = add_user(data, "gail")  # as an older server left it: the folder 0755, the database 0644
    os.chmod(data, 0o755)
    (data / "old").mkdir(mode=0o755)
    old = data / "old" / "notes.txt"
    old.write_text("{}\n")
    os.chmod(old, 0o644)
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--checkpoint-every", "1").start()
    try:
        client = srv.client(key)
        f = upload(client, CHAT)
        job = wait_job(client, client.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                                              hyperparameters={"n_epochs": 2}).id)
        assert job.status == "succeeded", job.error
        with srv.http(key) as h:
            for fmt in ("peft", "colaft"):
                assert h.get(f"/v1/fine_tuning/jobs/{job.id}/adapter?format={fmt}").status_code == 200
            assert h.get(f"/v1/files/{job.result_files[0]}/content").status_code == 200
        with srv.http(None) as h:  # keys in a URL are not taken (401) and never logged
            assert h.get(f"/v1/models?api_key={key}").status_code == 401
            assert h.get(f"/v1/files?limit=2&Token={key}&after=x").status_code == 401
            assert h.get(f"/v1/files/{key}").status_code == 401
    finally:
        srv.stop()

    log = srv.log_text()
    assert "GET /v1/models?api_key=[redacted]" in log and "/v1/files/sk-colaft-[redacted] " in log
    assert "Token=[redacted]&after=x" in log
    assert key not in log and key[len("sk-colaft-"):] not in log

    seen = {"folders": 0, "files": 0}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for root, folders, files in os.walk(data):
        for name in folders:
            assert stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode) == 0o700, os.path.join(root, name)
        for name in files:
            assert stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode) == 0o600, os.path.join(root, name)
        seen["folders"] += len(folders)
        seen["files"] += len(files)
    names = {p.name for p in data.rglob("*")}
    assert "colaft.db" in names and f.id in names and "notes.txt" in names
    assert any(n.endswith(".safetensors") for n in names)  # checkpoints and adapters were among them
    assert seen["folders"] >= 3 and seen["files"] >= 5
