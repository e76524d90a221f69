"""`colaft bench completions`: a short completion's latency alone and while a long one runs.

    completion_latency(url, key, model)     on any live `colaft serve` (reusable: other benchmarks
                                            call it with their own server and load)
      warm-up: one short completion
      each run: the short completion alone, timed
             -> a long one (max_tokens `long_tokens`) started in a thread; after `lead` seconds
                (it is generating by then) the short one again, timed, and whether the long
                one was still running when it came back (else that run measured nothing)
             -> the long one's end awaited
      -> medians of both, their ratio (beside / alone), every run's figures
    run_completions(...)                    starts `colaft serve` on loopback for one model
                                            (colaft.serve.launch), measures, writes the report

Greedy completions (temperature 0), so every run asks the same work of the server.
"""
from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from colaft.bench.harness import machine, write_report
from colaft.serve.launch import ServerProcess

SHORT_PROMPT = "What is the capital of France?"
LONG_PROMPT = "Write a very long, detailed story about a journey across the sea, chapter after chapter."


def _chat(h: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict:
    r = h.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                             "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    return r.json()


def completion_latency(url: str, key: str, model: str, short_tokens: int = 16, long_tokens: int = 2000,
                       runs: int = 3, lead: float = 2.0, timeout: float = 3600.0,
                       log: Callable[[str], None] = lambda _: None) -> dict:
    """Seconds of a short completion (`short_tokens`) alone and beside a long one (`long_tokens`)
    on the server at `url` (its API `key`, base or fine-tuned `model`): their medians over
    `runs`, the ratio, and each run's figures."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as h:
        def short() -> tuple[float, int]:
            start = time.perf_counter()
            answer = _chat(h, model, SHORT_PROMPT, short_tokens)
            return time.perf_counter() - start, answer["usage"]["completion_tokens"]

        short()  # warm-up
        rows = []
        for i in range(runs):
            alone, tokens = short()
            long: dict = {}

            def run_long(long=long):
                start = time.perf_counter()
                with httpx.Client(base_url=url, headers=headers, timeout=timeout) as h2:
                    long["tokens"] = _chat(h2, model, LONG_PROMPT, long_tokens)["usage"]["completion_tokens"]
                long["seconds"] = time.perf_counter() - start
            thread = threading.Thread(target=run_long, daemon=True)
            thread.start()
            time.sleep(lead)
            beside, _ = short()
            running = thread.is_alive()
            thread.join(timeout)
            rows.append({"alone_s": alone, "beside_s": beside, "short_tokens": tokens, "long_running": running,
                         "long_tokens": long.get("tokens"), "long_s": long.get("seconds")})
            log(f"run {i + 1}/{runs}: short alone {alone:.3f} s, beside the long one {beside:.3f} s "
                f"(long one {'still running' if running else 'ALREADY DONE'}; {long.get('tokens')} tokens in "
                f"{long.get('seconds', float('nan')):.1f} s)")
    alone = statistics.median(r["alone_s"] for r in rows)
    beside = statistics.median(r["beside_s"] for r in rows)
    return {"alone_s": alone, "beside_s": beside, "ratio": beside / alone,
            "valid": all(r["long_running"] for r in rows), "short_tokens": short_tokens, "long_tokens": long_tokens,
            "runs": rows}


def run_completions(model: str, out: Path, command: str, server_options: list[str] = (), threads: int | None = None,
                    log: Callable[[str], None] = print, **measure) -> dict:
    """`colaft serve --model bench=MODEL` on loopback (no training), `completion_latency` on it, a report."""
    from colaft.serve import auth
    from colaft.serve.db import Database

    info = machine("cpu")
    with tempfile.TemporaryDirectory(prefix="colaft-bench-completions-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = Database(f"sqlite:///{data / 'colaft.db'}")
        key = auth.add_user(db, "bench")[1]
        db.close()
        server = ServerProcess(data, [f"bench={model}"], "--backend", "inline", "--log-level", "warning",
                               *server_options, log=Path(tmp) / "server.log", threads=threads)
        try:
            server.start(timeout=300)
            result = completion_latency(server.url, key, "bench", log=log, **measure)
        finally:
            server.stop()
    data = {"command": command, "model": model, "machine": info, **result}
    lines = [f"# A short completion beside a long one ({model})", "", f"`{command}`", "",
             f"- short completion ({result['short_tokens']} tokens) alone: {result['alone_s']:.3f} s (median)",
             f"- the same while a {result['long_tokens']}-token completion runs: {result['beside_s']:.3f} s (median)",
             f"- ratio: **{result['ratio']:.2f}x**" + ("" if result["valid"] else
                                                    " (some long completions ended before the short one: invalid)"),
             f"- machine: {info['cpu']}, {info['cores']} cores", ""]
    write_report(out, "completions", "\n".join(lines), data)
    return data
