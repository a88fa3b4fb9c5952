#!/usr/bin/env bash
# One entry point for a fresh clone: it builds its own virtual environment (.venv), installs the
# pinned CPU torch first (constraints.txt), then this package with its extras, and runs a job.
#
#   bash scripts/dev.sh main     train + compress the digits CNN through LightningCLI
#   bash scripts/dev.sh test     the whole test suite (ruff, then pytest)
#   bash scripts/dev.sh setup    only build / refresh the environment
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python_bin" -m venv "$venv"
  fi
  # Re-install only when the dependency declarations changed (a stamp of their hash).
  local stamp="$venv/.lightning_dkm-stamp"
  local want
  want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing torch==2.13.0 (CPU) and lightning-dkm[dev,examples,coreml,coreai,coreai-opt]"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c constraints.txt "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev,examples,coreml,coreai,coreai-opt]"
    echo "$want" > "$stamp"
  fi
}

run_tests() {
  "$venv/bin/ruff" check lightning_dkm tests examples benchmarks
  set +e
  # every extra was installed above: a test of one that is missing fails (tests/extras.py)
  LIGHTNING_DKM_REQUIRE_EXTRAS=1 "$venv/bin/python" -m pytest "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
  fi
  exit "$rc"
}

run_main() {
  "$venv/bin/python" examples/digits_main.py --config examples/digits_dkm.yaml "$@"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  main) setup; run_main "$@" ;;
  *) echo "usage: bash scripts/dev.sh {main|test|setup} [args...]" >&2; exit 2 ;;
esac
