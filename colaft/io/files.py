"""Atomic folders and files: a crash or Ctrl-C never leaves a half-written one, and an existing
one survives a failed write.

Folders are filled in a hidden temporary sibling and renamed into place only when complete;
files are written to a hidden sibling, fsynced and renamed.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(directory: str | Path, markers: tuple[str, ...]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; when the block succeeds it replaces `directory`.

    An existing `directory` is replaced only if it is empty or holds one of `markers` (one of
    our checkpoints), so a mistyped path never wipes unrelated files.
    """
    target = Path(directory).resolve()  # a name to put the sibling next to, also for "."
    ours = target.is_dir() and (not any(target.iterdir()) or any((target / m).is_file() for m in markers))
    if target.exists() and not ours:
        raise FileExistsError(f"{target} exists and is not a checkpoint (no {' or '.join(markers)}): "
                              "refusing to replace it")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")  # not mkdtemp: keep the umask's mode
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that list them
            fsync(f)  # the data is on disk before the rename makes it visible
        _swap(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def build_atomically(targets: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Build each new folder with `build(folder)` in its own atomic_dir; they are all renamed into
    place only if every one was built, so a failure or Ctrl-C leaves no half-done run behind
    (nor the parent folders this call created)."""
    made_parents = [p for p in {Path(t).parent.resolve() for t, _ in targets} if not p.exists()]
    try:
        with ExitStack() as building:  # on an error every atomic_dir is unwound, none swapped in
            for target, build in targets:
                if Path(target).exists():
                    raise FileExistsError(f"{target} exists: choose another folder")
                build(building.enter_context(atomic_dir(target, markers=())))
    except BaseException:
        for parent in sorted(made_parents, reverse=True):  # only folders we created, if left empty
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that the file is either whole or absent, even after a kill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def _swap(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is deleted only once `new` is in place.

    POSIX cannot rename onto a non-empty directory, so the old one steps aside first. A hard
    crash between the two renames leaves both complete versions as hidden siblings.
    """
    old = new.with_name(new.name + ".old")
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync(target.parent)


def fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync elsewhere
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require(directory: str | Path, *names: str) -> Path:
    """`directory` as a Path, if it is a folder holding every file of `names`."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def read_json(path: Path):
    return json.loads(path.read_text())
