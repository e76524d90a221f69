"""`colaft serve` and `colaft users` (colaft.serve.commands): options refused before anything
loads, and a user's key printed once and stored only as its hash (with the real server); user
names in a documented character set, printed so that none can forge a line; the data folder
and the database created private."""
from __future__ import annotations

import os
import stat

import pytest


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
                          (["--transfer-dtype", "int8"], "--transfer-dtype: unknown transfer dtype 'int8'"),
                          (["--model", "a:b=x"], "an id has no ':'"),
                          (["--model", "x=smollm2-135m", "--model", "x=minilm-l6"], "the same id"),
                          (["--num-labels", "1"], "--num-labels >= 2")]:
        assert main(["serve", "--data-dir", str(tmp_path / "d"), *args]) == 1
        assert message in capsys.readouterr().err
    assert main(["users", "remove", "x", "--data-dir", str(tmp_path / "d")]) == 1
    assert "unknown action" in capsys.readouterr().err


def test_user_names_are_checked_and_printed_on_one_line(tmp_path, capsys):
    from colaft.app.cli import main
    from colaft.serve.db import Database, User, new_id

    data = tmp_path / "d"
    for name in ("eve\nforged\tuser-9\tsince 2020-01-01 00:00", "a b", "x" * 65, " ", "mallory\x1b[2J", "zoë"):
        assert main(["users", "add", name, "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert "user name" in err and "letters, digits" in err and err.count("\n") == 1, err
    assert main(["users", "add", "eve.o_k@x-1", "--data-dir", str(data)]) == 0
    assert "user eve.o_k@x-1 (user-" in capsys.readouterr().err
    # a name an older server stored outside the set lists on its own line, escaped
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    with db.session() as s:
        s.add(User(id=new_id("user"), name="eve\nforged\tuser-9", key_hash="0" * 64))
    db.close()
    assert main(["users", "list", "--data-dir", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == 3 for line in lines)
    assert {line.split("\t")[0] for line in lines} == {"eve.o_k@x-1", "'eve\\nforged\\tuser-9'"}
    assert main(["users", "rotate-key", "eve\nforged\tuser-9", "--data-dir", str(data)]) == 0
    assert "new API key of 'eve\\nforged\\tuser-9'" in capsys.readouterr().err


def test_users_makes_the_data_folder_and_database_private(tmp_path, capsys):
    from colaft.app.cli import main

    data = tmp_path / "new" / "d"
    assert main(["users", "add", "ann", "--data-dir", str(data)]) == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    made = list(data.iterdir())
    assert made and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in made), made  # with -wal, -shm
    os.chmod(data, 0o755)  # an older data folder is tightened, its files too
    os.chmod(data / "colaft.db", 0o644)
    assert main(["users", "list", "--data-dir", str(data)]) == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and stat.S_IMODE((data / "colaft.db").stat().st_mode) == 0o600


def test_a_data_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path):
    """Tightening modes is for colaft's own data: a mistyped --data-dir (a home folder) is refused."""
    from colaft.serve.commands import make_private

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt").chmod(0o644)
    with pytest.raises(ValueError, match="holds other files and no colaft data"):
        make_private(tmp_path)
    assert (tmp_path / "notes.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads' priorities are read from Linux's /proc")
def test_training_and_its_workers_run_nicer_than_the_api(server, alice):
    """The engines' threads (and the torch threads and fit workers they start) yield the CPU to the
    API's event loop: --training-niceness 10 by default."""
    import psutil
    from serve_helpers import CHAT, upload, wait_job

    job = alice.fine_tuning.jobs.create(model="llama", training_file=upload(alice, CHAT).id)
    assert wait_job(alice, job.id).status == "succeeded"  # the engine has trained (its workers started)
    pid = server.proc.pid
    nice = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}
    assert nice[pid] == 0  # the main thread: the event loop
    assert sorted(set(nice.values())) == [0, 10], nice  # the engines' threads and torch's under them
    workers = psutil.Process(pid).children(recursive=True)
    assert workers and all(w.nice() == 10 for w in workers), [(w.pid, w.cmdline()[:3], w.nice()) for w in workers]
