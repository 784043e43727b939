#!/usr/bin/env bash
# The GPU figures of issue 19 in one call, on one lent GPU, in at most 8 minutes (each part has its own timeout,
# so one that hangs cannot eat the others' time):
#   1. sddmm_gpu  the Triton SDDMM against a float64 reference, and against dense GEMM + gather per density
#                 (the crossover GPU_SDDMM_MAX_DENSITY should be)                          est. 30 s,  limit  70 s
#   2. gpu_step   one training step at 1B and 3B: full FT, PEFT LoRA, sparse old / new path  est. 90 s,  limit 165 s
#   3. gpu_fit    the largest Llama whose sparse step fits on the card, bf16 vs nf4 base,
#                 plus QLoRA's anchor (65B over a 4-bit base)                              est. 180 s, limit 235 s
# Results, all flat under $OUT (8 files): gpu_figures.md (the summary: card, versions, the three tables),
# gpu_sddmm.md/.json, gpu_step.md/.json, gpu_fit.md/.json, log.txt.
#
# With the `device` tool, from the repository root (the tool copies the working tree there):
#   run(command="bash src/sparseft/bench/gpu_figures.sh", timeout_s=570, carry=[".carry"])
# `.carry` brings torchao, which the H200 image lacks (without it the nf4 rows read "skipped"). Before the call, here:
#   echo /.carry/ >> .git/info/exclude && mkdir -p .carry && cp -r .venv/lib/python3*/site-packages/torchao .carry/ \
#     && find .carry -name '*.so' -delete   # 13 MB left; NF4 is pure Python, the compiled kernels are not needed
# Then commit $OUT/gpu_figures.md as docs/benchmarks/gpu_figures_<card>.md (e.g. gpu_figures_h200.md).
# Elsewhere: OUT=out/gpu bash src/sparseft/bench/gpu_figures.sh
# SMOKE=1: every part in its CPU smoke mode (tiny shapes, seconds; the test runs this).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
OUT=${OUT:-out/gpu_figures}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .carry ]; then export PYTHONPATH="$PYTHONPATH:.carry"; fi
LOG=$OUT/log.txt
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_ARGS=(--device cpu --tiny); fi

part() {  # part NAME SECONDS ARGS...: one benchmark under its own limit; its exit status goes to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date -u +%T)" >>"$LOG"
  timeout --kill-after=10 "$limit" "$PY" -m "$@" ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} >>"$LOG" 2>&1
  echo "== $name exit $? $(date -u +%T)" >>"$LOG"
}

nvidia-smi >"$LOG" 2>&1
part sddmm_gpu 70 sparseft.bench.sddmm_gpu --out "$OUT/gpu_sddmm.md"
part gpu_step 165 sparseft.bench.gpu_step --steps 10 --warmup 2 --out "$OUT/gpu_step.md"
part gpu_fit 235 sparseft.bench.gpu_fit --budget-s 215 --try-timeout-s 110 --out "$OUT/gpu_fit.md"

"$PY" - "$OUT" >>"$LOG" 2>&1 <<'EOF'
import importlib, sys, time
from pathlib import Path

import torch

out = Path(sys.argv[1])

def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as e:  # a missing package is a fact for the summary, not a failure of it
        return f"not available ({type(e).__name__})"

card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
lines = [f"# GPU figures: {card}", "",
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, triton {version('triton')}, "
         f"transformers {version('transformers')}, peft {version('peft')}, torchao {version('torchao')}",
         "", "Produced by `bash src/sparseft/bench/gpu_figures.sh`; each part's command is under its heading."]
for title, name in [("Triton SDDMM: accuracy and crossover", "gpu_sddmm.md"), ("One training step", "gpu_step.md"),
                    ("Largest model whose sparse step fits", "gpu_fit.md")]:
    part = out / name
    body = part.read_text() if part.exists() else "Did not finish: see log.txt."
    lines += ["", f"## {title}", "", body]
(out / "gpu_figures.md").write_text("\n".join(lines))
print(f"wrote {out / 'gpu_figures.md'}")
EOF
cat "$OUT/gpu_figures.md"
