"""The `colaft` command: plain typed functions, registered in one table (COMMANDS).

The modules of the commands import their heavy libraries (torch, transformers, matplotlib...)
inside the functions, so that `colaft --help` and `colaft CMD --help` start quickly; the
benchmark `colaft bench startup` measures it.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import typer
from pydantic import ValidationError

from colaft.app.experiment import experiment
from colaft.app.infer import evaluate, generate
from colaft.app.options import flag
from colaft.app.predict import predict
from colaft.app.train import train
from colaft.client import client
from colaft.serve.commands import serve, users

COMMANDS: dict[str, Callable] = {"train": train, "eval": evaluate, "predict": predict, "generate": generate,
                                  "experiment": experiment, "serve": serve, "users": users, "client": client}
"""Command name -> function; typer turns the signature into options."""



def _message(error: Exception) -> str:
    """One line for the user: pydantic errors name the option, everything else is flattened."""
    if isinstance(error, ValidationError):
        text = "; ".join(_validation_line(e) for e in error.errors())
    elif isinstance(error, typer.TyperException):
        text = error.format_message()
    else:
        text = str(error)
    return " ".join(text.split())


def _validation_line(e: dict) -> str:
    message = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
    if not e["loc"]:  # a check across fields
        return message
    return f"{flag('.'.join(map(str, e['loc'])))}: {message}"


def _quiet_transformers() -> None:
    """transformers' warnings (e.g. "newly initialised head": expected here) and progress bars off."""
    # read by transformers and the hub when they are first imported, which the commands do lazily
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (e.g. main() called in a process that uses it)
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


class Interrupted(Exception):
    """Ctrl-C in a command, with what was kept (typer would turn a KeyboardInterrupt into a silent 130)."""


def _interruptible(command: Callable) -> Callable:
    @functools.wraps(command)  # typer reads the signature through __wrapped__
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as e:  # a command that kept something says what; else nothing was
            raise Interrupted(str(e) if e.args else "nothing was saved") from None
    return run


def build_app() -> typer.Typer:
    """The `colaft` typer app: every command of COMMANDS, and `colaft bench`."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="ColA: fine-tune frozen models with Gradient Learning.")
    app.callback()(lambda: None)  # a group even with one command, so `colaft train` names it
    for name, command in COMMANDS.items():
        app.command(name)(_interruptible(command))
    from colaft.bench import bench_app  # its own sub-commands: colaft bench server, ...
    app.add_typer(bench_app, name="bench")
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `colaft` console script; returns the exit status."""
    _quiet_transformers()
    app = build_app()
    try:
        result = app(args=argv, prog_name="colaft", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except (ValueError, OSError, typer.TyperException) as error:
        if message := _message(error):  # empty when bare `colaft` has just printed the help
            print(f"colaft: error: {message}", file=sys.stderr)
        return error.exit_code if isinstance(error, typer.TyperException) else 1
    except (Interrupted, KeyboardInterrupt, typer.Abort) as error:
        kept = str(error) if isinstance(error, Interrupted) else "nothing was saved"
        print(f"colaft: interrupted: {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
