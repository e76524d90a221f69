"""`colaft serve` and `colaft users` (colaft.serve.commands): options refused before anything
loads, and a user's key printed once and stored only as its hash (with the real server)."""
from __future__ import annotations


def test_users_cli_prints_the_key_once_and_stores_only_its_hash(server, capsys):
    from colaft.app.cli import main

    assert main(["users", "add", "carol", "--data-dir", str(server.data_dir)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("sk-colaft-") and len(key) > 40 and "carol" in err and key not in err
    assert main(["users", "add", "carol", "--data-dir", str(server.data_dir)]) == 1  # a name is taken once
    assert "already exists" in capsys.readouterr().err
    # the running server takes the new key at once; the database holds no key in clear text
    assert server.client(key).models.list().data
    for path in server.data_dir.glob("colaft.db*"):
        assert key.encode() not in path.read_bytes()
    assert main(["users", "list", "--data-dir", str(server.data_dir)]) == 0
    listed = capsys.readouterr().out
    assert "carol" in listed and "sk-colaft" not in listed


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
