#!/usr/bin/env bash
# CUDA readiness check for lightning_dkm, for a machine with a GPU (about 3-5 minutes):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu_check
#
# 1. the CUDA smoke tests (tests/test_cuda_smoke.py): one epoch of DKMCallback on TinyNet under
#    16-mixed, bf16-mixed and bf16-true with every implementation, the clustering metrics
#    updating on the GPU, and DDP on 2 GPUs when torch.cuda.device_count() >= 2;
# 2. no host sync in a training step (tests/test_host_syncs.py, the
#    torch.cuda.set_sync_debug_mode("error") tests);
# 3. benchmarks/perf_step.py on CUDA (the CNN, every implementation, with
#    torch.cuda.max_memory_allocated per step; ResNet-18 and the MiniLM-size encoder with
#    "auto", where a step's kernel launches matter most: docs/benchmarks.md "On a GPU"; then
#    the peak-memory subprocesses for "auto").
#
# It prints a table of the checks and the perf rows, writes the JSON and logs to OUT_DIR, and
# exits non-zero if any check failed (or if this Python has no CUDA).
#
# Python: $PYTHON if set, else the repo's .venv (bash scripts/dev.sh setup creates it), else
# python3. dev.sh installs the CPU build of torch; on a GPU machine install a CUDA build into
# the same environment first, e.g.
#   .venv/bin/python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="python3"
fi
out="${1:-$root/benchmarks/results/gpu_check}"
mkdir -p "$out"

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda build:', torch.version.cuda)" || true
  echo "gpu_check: $py has no usable CUDA device (a CPU build of torch, or no GPU); see the" \
       "header of this script" >&2
  exit 1
fi
"$py" - <<'EOF' | tee "$out/setup.txt"
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
EOF

names=()
codes=()
seconds=()
check() {  # check NAME COMMAND...: run it, log to OUT_DIR/NAME.log, record rc and time
  local name="$1"
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  names+=("$name")
  codes+=("$rc")
  seconds+=("$((SECONDS - start))")
}

export PYTHONWARNINGS="ignore"
check cuda-smoke "$py" -m pytest tests/test_cuda_smoke.py -q -rs -p no:cacheprovider
check host-syncs "$py" -m pytest tests/test_host_syncs.py -q -rs -p no:cacheprovider -k cuda
check perf-step "$py" benchmarks/perf_step.py --device cuda --models cnn --bits 2 4 \
  --implementations auto unique chunked reference --steps 10 --warmup 3 --no-memory \
  --json "$out/perf_step_cuda.json"
check perf-models "$py" benchmarks/perf_step.py --device cuda --models resnet18 minilm \
  --bits 2 4 --implementations auto --steps 10 --warmup 3 --no-memory \
  --json "$out/perf_models_cuda.json"
check perf-memory "$py" benchmarks/perf_step.py --device cuda --models cnn --bits 4 \
  --implementations auto --steps 5 --warmup 2 --json "$out/perf_memory_cuda.json"

echo
echo "check          result  seconds"
failed=0
for i in "${!names[@]}"; do
  if [ "${codes[$i]}" -eq 0 ]; then verdict="ok"; else verdict="FAIL(${codes[$i]})"; failed=1; fi
  printf "%-14s %-7s %7s\n" "${names[$i]}" "$verdict" "${seconds[$i]}"
done

if [ -f "$out/perf_step_cuda.json" ]; then
  echo
  "$py" - "$out/perf_step_cuda.json" "$out/perf_models_cuda.json" <<'EOF'
import json
import os
import sys

rows = [r for f in sys.argv[1:] if os.path.exists(f) for r in json.load(open(f))["rows"]]
print(f"{'model':8s} {'bits':>4s} {'impl':9s} {'plain ms':>9s} {'dkm ms':>8s} {'ratio':>6s} "
      f"{'plain peak MB':>13s} {'dkm peak MB':>11s} {'dkm step +MB':>12s}")
for r in rows:
    print(f"{r['model']:8s} {r['bits']:4d} {r['implementation']:9s} {r['plain_ms']:9.2f} "
          f"{r['dkm_ms']:8.2f} {r['ratio']:6.2f} {r.get('plain_cuda_peak_mb', float('nan')):13.1f} "
          f"{r.get('dkm_cuda_peak_mb', float('nan')):11.1f} "
          f"{r.get('dkm_cuda_step_mb', float('nan')):12.1f}")
EOF
fi
echo
echo "logs and JSON in $out"
exit "$failed"
