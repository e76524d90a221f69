"""`colaft bench`: the one place where speed and memory are measured.

Each section is a command of `bench_app` (a typer app, mounted by the CLI as `colaft bench`);
they share the harness: interleaved timing, fresh-process memory, report writing.
"""
from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Measure speed and memory (writes markdown, JSON and PNG reports).",
                        no_args_is_help=True, add_completion=False)


@bench_app.callback()
def _sections() -> None:
    """Benchmarks of colaft; each section writes its report under --out."""


def _command_line(section: str) -> str:
    """The command as a user would type it, however it was started (colaft, python -m, a test)."""
    args = sys.argv[sys.argv.index(section) + 1:] if section in sys.argv else []
    return shlex.join(["colaft", "bench", section, *args])


def _timed_log() -> Callable[[str], None]:
    """Progress lines stamped with the seconds since the command started."""
    start = time.perf_counter()
    return lambda msg: typer.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}")


@bench_app.command("server")
def server_command(
    model: Annotated[list[str] | None, typer.Option(
        help="Benchmark model (repeatable): tiny, smollm2-135m, minilm-l6, llama-large, "
             "optionally with config overrides, e.g. llama-large:num_hidden_layers=8.")] = None,
    quick: Annotated[bool, typer.Option(help="The tiny model, few rounds, one memory run: a smoke test.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[list[str] | None, typer.Option(help="float32 | bfloat16 | float16 (repeatable).")] = None,
    targets: Annotated[str | None, typer.Option(
        help="Comma-separated target modules or all-linear (default: the model's task recipe).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default: per model and device).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per row (default: per model and device).")] = None,
    rank: Annotated[int, typer.Option(help="Rank of LoRA and of ColA's lowrank adapters (alpha = 2 rank).")] = 8,
    rounds: Annotated[int, typer.Option(help="Timed rounds (one step of every configuration each).")] = 7,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 1,
    memory_runs: Annotated[int, typer.Option(help="Fresh processes per configuration on CPU (0: no memory).")] = 3,
    memory_steps: Annotated[int, typer.Option(help="Steps per memory measurement.")] = 2,
    jobs: Annotated[int, typer.Option(help="Memory processes at once.")] = 1,
    fit_repeats: Annotated[int, typer.Option(help="Timed repeats of the fit on the CPU.")] = 3,
    max_seconds: Annotated[float | None, typer.Option(
        help="Stop timing a run after this many seconds (at least 3 rounds).")] = None,
    budget: Annotated[float | None, typer.Option(
        help="Skip the runs that would start after this many seconds.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    only: Annotated[str | None, typer.Option(
        help="Comma-separated configurations besides floor and peft-lora, e.g. cola-lowrank,full-ft.")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """Server time and memory per step: ColA (unmerged, merged, + fit) vs PEFT LoRA, full fine-tuning and the floor."""
    from colaft.bench.server import Settings, run_server
    from colaft.bench.server_report import summary

    if quick:
        model, rounds, memory_runs, jobs, fit_repeats = model or ["tiny"], min(rounds, 3), 1, 2, 1
    from colaft.runtime import default_device
    settings = Settings(device=device or default_device(), dtypes=dtype or ["float32"], targets=targets,
                        batch_size=batch_size, seq_len=seq_len, rank=rank, rounds=rounds, warmup=warmup,
                        memory_runs=memory_runs, memory_steps=memory_steps, jobs=jobs, fit_repeats=fit_repeats,
                        max_seconds=max_seconds, budget=budget, threads=threads,
                        configs=only.split(",") if only else None)
    log = _timed_log()
    data = run_server(model or ["smollm2-135m", "minilm-l6"], settings, out,
                      command=_command_line("server"), log=log)
    typer.echo(summary(data))
    typer.echo(f"report: {out / 'server.md'}")


@bench_app.command("offload")
def offload_command(
    quick: Annotated[bool, typer.Option(help="Small batches, few steps and rounds: a smoke test.")] = False,
    backends: Annotated[str, typer.Option(help="Comma-separated: inline, process, ray.")] = "inline,process,ray",
    workers: Annotated[int, typer.Option(help="Worker processes or Ray actors per trainer.")] = 1,
    threads: Annotated[int, typer.Option(help="The server's torch threads.")] = 1,
    block: Annotated[int, typer.Option(help="Steps per timed block.")] = 6,
    rounds: Annotated[int, typer.Option(help="Timed rounds (one block of every configuration each).")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps of each staleness run.")] = 100,
    staleness: Annotated[list[int] | None, typer.Option(help="Staleness bounds to train with (repeatable).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default: the task recipe's).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Token cap (default: the task recipe's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the task recipe's).")] = None,
    eval_examples: Annotated[int, typer.Option(help="Held-out reviews evaluated after each run.")] = 512,
    parts: Annotated[str, typer.Option(help="Comma-separated: throughput, staleness.")] = "throughput,staleness",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """End-to-end throughput with the fits inline, on processes and on Ray (S = 0, 1), and loss vs staleness."""
    from colaft.bench.offload import Settings, run_offload

    if quick:
        steps, rounds, block, batch_size, max_length = min(steps, 4), min(rounds, 2), min(block, 2), 8, 16
        eval_examples, staleness = min(eval_examples, 32), staleness or [0, 1]
    settings = Settings(backends=[b.strip() for b in backends.split(",") if b.strip()], workers=workers,
                        threads=threads, block=block, rounds=rounds, steps=steps,
                        stalenesses=staleness or [0, 1, 2], batch_size=batch_size, max_length=max_length, lr=lr,
                        eval_examples=eval_examples, parts=[p.strip() for p in parts.split(",") if p.strip()])
    log = _timed_log()
    run_offload(settings, out, command=_command_line("offload"), log=log)
    typer.echo((out / "offload.md").read_text())
    typer.echo(f"report: {out / 'offload.md'}")


@bench_app.command("packets")
def packets_command(
    model: Annotated[str, typer.Option(help="The sc task's model: minilm-l6 or a folder.")] = "minilm-l6",
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 32,
    max_length: Annotated[int | None, typer.Option(help="Token cap (default: the task recipe's).")] = None,
    steps: Annotated[int, typer.Option(help="Training batches measured.")] = 8,
    quick: Annotated[bool, typer.Option(help="Two batches of 8 rows: a smoke test.")] = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """Packet bytes per server step: every x sent per site (before) vs a shared x once, float32 and bfloat16."""
    from colaft.bench.packets import Settings, run_packets, summary

    if quick:
        steps, batch_size = min(steps, 2), min(batch_size, 8)
    data = run_packets(Settings(model=model, batch_size=batch_size, max_length=max_length, steps=steps), out,
                       command=_command_line("packets"), log=_timed_log())
    typer.echo(summary(data))
    typer.echo(f"report: {out / 'packets.md'}")


@bench_app.command("users")
def users_command(
    model: Annotated[str, typer.Option(
        help="Benchmark model: tiny, smollm2-135m, minilm-l6, llama-large, optionally with config overrides.")
    ] = "minilm-l6",
    quick: Annotated[bool, typer.Option(help="The tiny model, K up to 4, few rounds, one memory run: a smoke test.")
                     ] = False,
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of users in the batch.")] = "1,2,4,8,16,32",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    batch_size: Annotated[int, typer.Option(help="Rows per batch, shared among the K users.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per row.")] = 16,
    rank: Annotated[int, typer.Option(help="Rank of the users' lowrank adapters and PEFT's LoRA (alpha = 2 rank).")
                    ] = 8,
    layout: Annotated[str, typer.Option(help="blocks (each user's rows together) or interleaved.")] = "blocks",
    collaborative: Annotated[bool, typer.Option(help="Also the mixed step in collaborative mode.")] = True,
    types: Annotated[bool, typer.Option(help="Also users of mixed adapter types (largest K).")] = True,
    peft: Annotated[bool, typer.Option(help="Also PEFT's mixed-adapter forward.")] = True,
    rounds: Annotated[int, typer.Option(help="Timed rounds (one step of every configuration each).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 1,
    memory_runs: Annotated[int, typer.Option(help="Fresh processes per memory case on CPU (0: no memory).")] = 2,
    memory_steps: Annotated[int, typer.Option(help="Steps per memory measurement.")] = 2,
    jobs: Annotated[int, typer.Option(help="Memory processes at once.")] = 1,
    max_seconds: Annotated[float | None, typer.Option(
        help="Stop timing after this many seconds (at least 3 rounds).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """One server step for a batch mixing K users' rows: vs K separate steps, vs PEFT's mixed forward, and memory."""
    from colaft.bench.users import Settings, run_users
    from colaft.bench.users_report import summary

    k_list = [int(k) for k in ks.split(",") if k.strip()]
    if quick:
        model, rounds, memory_runs, jobs = "tiny", min(rounds, 2), 1, 2
        batch_size, seq_len, k_list = 8, 8, [k for k in k_list if k <= 4] or [1, 2, 4]
    from colaft.runtime import default_device
    settings = Settings(model=model, device=device or default_device(), dtype=dtype, batch_size=batch_size,
                        seq_len=seq_len, ks=k_list, rank=rank, layout=layout, collaborative=collaborative,
                        types=types, peft=peft, rounds=rounds, warmup=warmup, memory_runs=memory_runs,
                        memory_steps=memory_steps, jobs=jobs, max_seconds=max_seconds, threads=threads)
    log = _timed_log()
    data = run_users(settings, out, command=_command_line("users"), log=log)
    typer.echo(summary(data))
    typer.echo(f"report: {out / ('users-' + data['model'].replace(':', '_').replace(',', '_').replace('=', '-'))}.md")


@bench_app.command("serve")
def serve_command(
    quick: Annotated[bool, typer.Option(help="8 users, short windows: a smoke test.")] = False,
    users: Annotated[int, typer.Option(help="Simulated users, each with its own API key and job.")] = 64,
    client_every: Annotated[int, typer.Option(
        help="Every so many users' jobs fit on the user's client (colaft.client.Client); 0: none.")] = 8,
    model: Annotated[str, typer.Option(
        help="tiny (2-layer, 64-wide Llama, random weights), a built-in model or a folder.")] = "tiny",
    backend: Annotated[str, typer.Option(help="The server's backend for server fits.")] = "process",
    think: Annotated[float, typer.Option(help="Seconds (±50%) a user waits between requests under load.")] = 1.0,
    window: Annotated[float, typer.Option(help="Seconds of each quiet or load window.")] = 15.0,
    pairs: Annotated[int, typer.Option(help="(quiet, load) window pairs, in ABBA order.")] = 3,
    checkpoint_every: Annotated[int, typer.Option(help="The server's --checkpoint-every.")] = 1000,
    log_level: Annotated[str, typer.Option(
        help="The server's log level; other than warning, its whole log is kept as serve-server.log.")] = "warning",
    abuse: Annotated[bool, typer.Option(
        help="Hostile clients too in the load windows (oversized, nested, slow bodies, floods, long polls, ...); "
             "each good user also runs a short job that must succeed.")] = False,
    abuse_scale: Annotated[float, typer.Option(help="Times each attack's concurrency (--abuse).")] = 1.0,
    attacker_niceness: Annotated[int, typer.Option(
        min=0, max=19, help="The attacking process's niceness (--abuse): 10 leaves the server's cores to it, "
                            "as an attacker on another machine would; 0 shares them evenly.")] = 10,
    servers: Annotated[int | None, typer.Option(
        help="Instead: 1 and N serve processes on one private PostgreSQL database (jobs' steps/s, status p99) "
             "and the time from killing one to the takeover; writes servers.md.")] = None,
    jobs: Annotated[int, typer.Option(help="Jobs per round (--servers).")] = 8,
    rounds: Annotated[int, typer.Option(help="Rounds per configuration (--servers).")] = 3,
    kills: Annotated[int, typer.Option(help="Kills measured (--servers).")] = 2,
    lease_seconds: Annotated[float, typer.Option(help="The processes' --lease-seconds (--servers).")] = 10.0,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """The service under load: many users' requests while training runs, vs the same jobs with no traffic;
    or, with --servers N, several processes on one database."""
    if servers is not None:
        from colaft.bench.servers import Settings as Fleet
        from colaft.bench.servers import run_servers

        if servers < 2 or jobs < 1 or rounds < 1 or kills < 0:
            raise ValueError("--servers >= 2, --jobs >= 1, --rounds >= 1 and --kills >= 0, please")
        fleet = Fleet(servers=servers, jobs=min(jobs, 4) if quick else jobs, rounds=1 if quick else rounds,
                      kills=min(kills, 1) if quick else kills, lease_seconds=lease_seconds,
                      model=model, epochs=3 if quick else 10)
        run_servers(fleet, out, command=_command_line("serve"), log=_timed_log())
        typer.echo(f"report: {out / 'servers.md'}")
        return
    from colaft.bench.serve_load import Settings, run_serve
    from colaft.bench.serve_load_report import summary

    warmup = 5.0
    if quick:
        users, window, pairs, warmup = min(users, 8), min(window, 3.0), 1, 1.0
        client_every = client_every and min(client_every, 4)
        abuse_scale = min(abuse_scale, 0.05)
    settings = Settings(users=users, client_every=client_every, model=model, backend=backend, think=think,
                        window=window, pairs=pairs, warmup=warmup, checkpoint_every=checkpoint_every,
                        log_level=log_level, abuse=abuse, abuse_scale=abuse_scale,
                        attacker_niceness=attacker_niceness)
    log = _timed_log()
    data = run_serve(settings, out, command=_command_line("serve"), log=log)
    typer.echo(summary(data))
    typer.echo(f"report: {out / 'serve.md'}")


@bench_app.command("polls")
def polls_command(
    polls: Annotated[int, typer.Option(help="Long polls of one client-fit job waiting at once.")] = 1000,
    wait: Annotated[float, typer.Option(help="Seconds each poll may wait on the server.")] = 30.0,
    probes: Annotated[int, typer.Option(help="Calls each of /health and the job's status, per phase.")] = 300,
    quick: Annotated[bool, typer.Option(help="100 polls, 50 probes: a smoke test.")] = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """/health and a job's status (p50, p99) with no poll, then while many long polls wait."""
    from colaft.bench.polls import Settings, run_polls, summary

    if polls < 1 or probes < 1 or wait <= 0:
        raise ValueError("--polls >= 1, --probes >= 1 and --wait > 0, please")
    if quick:
        polls, probes = min(polls, 100), min(probes, 50)
    data = run_polls(Settings(polls=polls, wait=wait, probes=probes), out, command=_command_line("polls"),
                     log=_timed_log())
    typer.echo(summary(data))
    typer.echo(f"report: {out / 'polls.md'}")


@bench_app.command("completions")
def completions_command(
    model: Annotated[str, typer.Option(help="The served base model: a built-in name or a folder.")] = "smollm2-135m",
    short_tokens: Annotated[int, typer.Option(help="max_tokens of the short completion.")] = 16,
    long_tokens: Annotated[int, typer.Option(help="max_tokens of the long one (within the server's cap).")] = 2000,
    runs: Annotated[int, typer.Option(help="Runs (alone, then beside a long one); medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option(help="The server's OMP_NUM_THREADS (default: its own).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """A short completion's latency alone and while a long completion runs, on a live `colaft serve`."""
    from colaft.bench.completions import run_completions

    data = run_completions(model, out, _command_line("completions"), threads=threads, log=_timed_log(),
                           short_tokens=short_tokens, long_tokens=long_tokens, runs=runs)
    typer.echo(f"short alone {data['alone_s']:.3f} s, beside a long one {data['beside_s']:.3f} s: "
               f"{data['ratio']:.2f}x{'' if data['valid'] else ' (invalid: a long one ended first)'}")
    typer.echo(f"report: {out / 'completions.md'}")


@bench_app.command("stream")
def stream_command(
    model: Annotated[list[str] | None, typer.Option(help="Benchmark model (repeatable; default tiny).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    rounds: Annotated[int, typer.Option(help="Timed rounds (one step of each configuration each).")] = 10,
    in_flight: Annotated[int, typer.Option(help="Copies to the host under way at once.")] = 4,
    batch: Annotated[str | None, typer.Option(help="ROWSxTOKENS (default: the preset's for the device).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for stream.json.")] = None,
) -> None:
    """The server step with packets streamed to host memory during the backward vs the ordinary
    step: step time and the device's peak memory (a GPU measurement; on CPU a smoke run)."""
    from colaft.bench import stream
    stream.main(model or ["tiny"], device, dtype, rounds, in_flight, batch, out)


@bench_app.command("startup")
def startup_command(
    runs: Annotated[int, typer.Option(help="Fresh processes per command (their median is reported).")] = 7,
    quick: Annotated[bool, typer.Option(help="Two runs each: a smoke test.")] = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("runs/bench"),
) -> None:
    """Seconds before a command does anything: `colaft --help`, `colaft train --help`, `import colaft`."""
    from colaft.bench.startup import run_startup, summary

    if runs < 1:
        raise ValueError(f"--runs must be >= 1, not {runs}")
    data = run_startup(min(runs, 2) if quick else runs, out, command=_command_line("startup"), log=_timed_log())
    typer.echo(summary(data))
    typer.echo(f"report: {out / 'startup.md'}")
