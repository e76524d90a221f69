#!/usr/bin/env bash
# The server benchmark on a CUDA machine: ColA vs PEFT LoRA vs the floor, in bfloat16 and
# float32, memory from the CUDA allocator. Models are built from their configs with random
# weights, so nothing is downloaded or read from disk; runs from the repository root with
# PYTHONPATH=. (no install). A configuration that fails (out of memory, ...) is reported in
# the table and the others go on; the runs that would start after --budget seconds are
# skipped, and `timeout` is the last resort, so the whole script stays under 8 minutes.
# Without CUDA it runs the CPU smoke benchmark instead (colaft bench server --quick).
#
#   bench/gpu.sh                 # writes runs/bench-gpu/; with OUT set, also copies the reports there
#   PYTHON=python3.11 bench/gpu.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST="runs/bench-gpu"
mkdir -p "$DEST"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, transformers, peft, pydantic, typer, matplotlib" 2>"$DEST/preflight.txt"; then
  echo "missing packages:"; cat "$DEST/preflight.txt"; exit 1
fi

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ARGS=(--device cuda --dtype bfloat16 --dtype float32
        --model smollm2-135m --model minilm-l6 --model llama-large
        --rounds 20 --warmup 2 --max-seconds 25 --fit-repeats 1 --budget 300)
else
  echo "no CUDA device: running the CPU smoke benchmark"
  ARGS=(--device cpu --quick)
fi

timeout -k 10 410 "$PY" -m colaft.bench server "${ARGS[@]}" --out "$DEST" 2>&1 | tee "$DEST/log.txt"
echo "exit status: ${PIPESTATUS[0]}"
# Packets streamed to pinned host memory during the backward vs built after it (step time and
# peak device memory, both ending with the packets on the host); on CPU a short smoke run.
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  STREAM=(--model minilm-l6 --model smollm2-135m --rounds 10)
else
  STREAM=(--model tiny --rounds 2)
fi
timeout -k 5 40 "$PY" -m colaft.bench stream "${STREAM[@]}" --out "$DEST" 2>&1 | tee -a "$DEST/log.txt"
# A machine that hands back only a few files gets the reports and the log; the plots go in one archive.
if [ -n "${OUT:-}" ]; then
  cp "$DEST"/server.md "$DEST"/server.json "$DEST"/stream.json "$DEST"/log.txt "$OUT"/ 2>/dev/null
  tar -C "$DEST" -czf "$OUT/plots.tar.gz" $(cd "$DEST" && ls *.png 2>/dev/null)
fi
echo
echo "===== $DEST/server.md ====="
cat "$DEST/server.md" 2>/dev/null || echo "no report written (see $DEST/log.txt)"
