"""Running `colaft` in the test process: exit status and output, or its one error line."""
from __future__ import annotations

from colaft.app.cli import main


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of `colaft ARGS`."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


def error_of(capsys, *args) -> str:
    """The one error line of a command that must fail."""
    status, _, err = run_cli(capsys, *args)
    assert status != 0 and len(err) == 1 and err[0].startswith("colaft: error: "), err
    return err[0]
