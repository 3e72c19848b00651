#!/usr/bin/env bash
# The accelerator check, in a few minutes, on a machine with an NVIDIA GPU:
#   attention   bf16, self-attention L = 1024/4096/8192, 16 heads of 128: cudnn, pallas,
#               chunked, xla, forward and forward+backward, as a fraction of the bf16
#               dense peak (PEAK_TFLOPS, default 989: H100/H200 SXM; FlashAttention-3
#               reaches about 0.75 of it forward)
#   train step  the small model's jitted train step (bench/train_step.py, 60 steps)
#   int8/int4   bench/deploy.py: fp32 / int8 W8A8 / int4 artifacts (latency, throughput)
#               and the in-process forwards, the Pallas int4 kernel among them
# then one table of the headline numbers (bench/out/device/summary.txt).
#
#   bench/device_check.sh                 # needs jax with CUDA (README: GPU or TPU)
#   SMOKE=1 bench/device_check.sh         # any machine: tiny sizes, checks the script runs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT_DIR:-bench/out/device}"
mkdir -p "$OUT"
if [[ "${SMOKE:-0}" == 1 ]]; then
  LENGTHS=256 HEADS=2 HD=64 REPS=1 STEPS=5 IMPLS=xla,pallas,chunked
else
  "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' || {
    echo "error: no GPU backend in $PY (jax.default_backend() is not 'gpu'); install jax" \
         "with CUDA (README, 'GPU or TPU instead of CPU'), or SMOKE=1 for a CPU smoke run." >&2
    exit 2; }
  LENGTHS=1024,4096,8192 HEADS=16 HD=128 REPS=5 STEPS=60 IMPLS=cudnn,pallas,chunked,xla
fi
"$PY" -c 'import jax; print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__)' \
  | tee "$OUT/device.txt"
"$PY" bench/attention.py --dtype bfloat16 --impls "$IMPLS" --lengths "$LENGTHS" \
  --heads "$HEADS" --head_dim "$HD" --reps "$REPS" --peak_tflops "${PEAK_TFLOPS:-989}" \
  --out "$OUT/attention.json" | tee "$OUT/attention.txt"
"$PY" bench/train_step.py --steps "$STEPS" --reps "$REPS" --data_dir "$OUT/tfds" \
  --out "$OUT/train_step.json" | tee "$OUT/train_step.txt"
"$PY" bench/deploy.py --reps "$(( REPS * 3 ))" --out "$OUT/deploy.json" | tee "$OUT/deploy.txt"
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
load = lambda n: json.load(open(os.path.join(out, n)))
att, ts, dep = load("attention.json"), load("train_step.json"), load("deploy.json")
print(open(os.path.join(out, "device.txt")).read().strip())
print(f"\n{'what':44s} {'value':>14s}")
for r in att["rows"]:
  frac = r.get("peak_fraction")
  print(f"{'attention ' + r['impl'] + ' L=' + str(r['length']) + ' ' + r['pass_']:44s} "
        f"{r['gflops'] / 1e3:9.1f} TF/s" + (f"  {frac:.2f} of peak" if frac else ""))
for k, v in ts.items():
  if isinstance(v, (int, float)):
    print(f"{'train step ' + k:44s} {v:14.4g}")
for name, a in dep["artifacts"].items():
  print(f"{'artifact ' + name + ' latency b1 (ms)':44s} {a['latency_b1_ms']:14.2f}")
  print(f"{'artifact ' + name + ' throughput b64 (ex/s)':44s} {a['throughput_b64']:14.0f}")
for k, v in dep["forward"].items():
  if "median_ms" in v:
    print(f"{'forward b64 ' + k + ' (x fp32)':44s} {v['vs_fp32']:14.2f}")
PYEOF
