#!/usr/bin/env bash
# One entry point for people and CI. Works from any working directory.
#   ./launch.sh setup        create .venv and install mmjax[test] with pinned constraints
#   ./launch.sh test [ARGS]  setup, then the whole test suite (ARGS go to pytest)
#   ./launch.sh quickstart   setup, then the main job
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MMJAX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<USAGE
usage: ./launch.sh <command> [args]

commands:
  setup          create $VENV (if missing) and install mmjax[test] pinned by
                 constraints.txt; skipped when setup.py and constraints.txt are unchanged
  test [ARGS]    setup, then run the whole test suite (extra ARGS are passed to pytest)
  quickstart [FLAGS]
                 setup, then the main job: prepare the offline dataset if missing,
                 train the dense 'small' model, compress it (distillation + pruning +
                 int8), print the report and a dense-vs-compressed table, write
                 pareto.png (--workdir=workdirs/quickstart; --tiny: a 2-minute smoke run)
  train FLAGS    setup, then python -m experiments.main FLAGS, e.g.
                 --config=experiments/configs/dense.py:tiny --workdir=/tmp/run
  gpu FLAGS      train on NVIDIA GPUs with recommended XLA flags (--dry-run: print only)
  tpu NAME ZONE FLAGS
                 run train on every worker of Cloud TPU VM NAME in ZONE through
                 gcloud, with multi-host initialisation (--dry-run: print only)
  help           this message

environment:
  MMJAX_VENV     where the virtual environment lives (default: <repo>/.venv)
  PYTHON         the interpreter used to create it (default: python3, needs >= 3.10)
USAGE
}

# pip, minus the warnings this machine's pip config prints about absent local indexes.
pip_quiet() {
  local rc=0
  "$VENV/bin/python" -m pip "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; } || rc=$?
  return $rc
}

# espeak-ng speaks the digits of mm_arith/real (offline). Installed when we can (root
# on Debian/Ubuntu); otherwise only that dataset config needs it, and it says how.
ensure_espeak() {
  command -v espeak-ng >/dev/null 2>&1 && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing espeak-ng (offline speech for mm_arith/real)"
    if ! apt-get install -y -qq espeak-ng >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      apt-get install -y -qq espeak-ng >/dev/null 2>&1 ||
        echo "[setup] warning: could not install espeak-ng; mm_arith/real will need it" >&2
    fi
  else
    echo "[setup] note: espeak-ng is not installed; only mm_arith/real needs it" \
      "(sudo apt-get install espeak-ng)" >&2
  fi
}

setup() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: mmjax needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)." >&2
    echo "       Set PYTHON=/path/to/python3.10+ and run again." >&2
    exit 1
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  ensure_espeak
  local stamp="$VENV/.mmjax-install-stamp" want
  want="$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "[setup] installing mmjax[test] with pinned versions (constraints.txt)"
  pip_quiet install --quiet --upgrade pip
  pip_quiet install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  echo "$want" >"$stamp"
  echo "[setup] done"
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup)
    setup
    ;;
  test)
    setup
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  quickstart)
    setup
    cd "$ROOT"
    exec "$VENV/bin/python" -m experiments.quickstart "$@"
    ;;
  train)
    setup
    cd "$ROOT"
    exec "$VENV/bin/python" -m experiments.main "$@"
    ;;
  gpu)
    dry=0 args=()
    for a in "$@"; do [[ "$a" == "--dry-run" ]] && dry=1 || args+=("$a"); done
    flags="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true"
    if [[ $dry == 1 ]]; then
      echo "XLA_FLAGS='$flags' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 $VENV/bin/python -m experiments.main ${args[*]}"
      exit 0
    fi
    setup
    cd "$ROOT"
    XLA_FLAGS="$flags ${XLA_FLAGS:-}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      exec "$VENV/bin/python" -m experiments.main "${args[@]}"
    ;;
  tpu)
    if [[ $# -lt 2 ]]; then
      echo "error: usage: ./launch.sh tpu <tpu-name> <zone> [--dry-run] FLAGS" >&2
      exit 2
    fi
    name="$1" zone="$2"
    shift 2
    dry=0 args=()
    for a in "$@"; do [[ "$a" == "--dry-run" ]] && dry=1 || args+=("$(printf '%q' "$a")"); done
    remote="cd ~/mmjax && MMJAX_DISTRIBUTED=1 ./launch.sh train ${args[*]}"
    cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
    if [[ $dry == 1 ]]; then
      printf '%q ' "${cmd[@]}"
      echo
      exit 0
    fi
    exec "${cmd[@]}"
    ;;
  help | -h | --help)
    usage
    ;;
  *)
    echo "error: unknown command '$cmd'" >&2
    usage >&2
    exit 2
    ;;
esac
