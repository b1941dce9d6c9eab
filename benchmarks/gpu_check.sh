#!/usr/bin/env bash
# The GPU check of the whole-step update, in one device call of at most 8 minutes, most important first:
#   1. the JAX anchor (the same update jitted as one call per env step) on the card;
#   2. the speed table at Ant-v5 paper size (critic 2048, batch 256), eager and "whole"
#      (benchmarks/throughput.py --only speed: ms of updates per env step, per action, per learning step);
#   3. a 2-minute real fit on conf/ant.yaml with the defaults a user gets (the speed settings' "auto": the whole
#      update as CUDA graphs after its start-up self-check, replay storage on the GPU, acting replayed as a CUDA
#      graph), env steps/s in the learning phase and the modes they resolved to (benchmarks/fit_speed.py);
#   4. the speed table for the compiled-loss modes ("default", "reduce-overhead").
# Each part writes its JSON under $OUT as soon as it ends, so a part cut by the time limit loses only itself;
# $OUT/summary.md is the table for BENCHMARKS.md.
#
#   benchmarks/gpu_check.sh --prepare       # here, once: wheels the device image lacks into .whl/, the JAX
#                                           # anchor into .device/anchor/ (both git-ignored)
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl", ".device"], timeout_s 540
#   benchmarks/gpu_check.sh --cpu-dry-run   # the same path on this CPU at tiny sizes (the tests run it)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = "--prepare" ]; then
  # the device image has torch, lightning and JAX; these travel as wheels (Python 3.12, x86-64 Linux)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl .device/anchor
  cp ../shared/anchors/jax_dime_update.py .device/anchor/
  for wheel in torchrl==0.14.1 tensordict==0.14.3 gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==3.17.0 \
               glfw==2.11.0 pyopengl==3.1.10 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
               orjson==3.13.0 pyvers==0.2.3 importlib-metadata==9.1.0; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$wheel"
  done
  du -sh .whl .device
  exit 0
fi

if [ "$mode" = "--cpu-dry-run" ]; then
  # the same path; eager only, since the tests compile the whole step elsewhere (tests/test_update.py)
  device=cpu; tiny=(--tiny); sizes=(--sizes paper); seconds=3; update=none
  fit=(--config conf/pendulum.yaml --config conf/smoke.yaml --data.total_env_steps 100000 --model.update.compile none)
  jax_env=(ENVS=Ant-v5 WIDTHS=64 N_ITER=2)
else
  device=cuda; tiny=(); sizes=(--sizes paper); seconds=120; update=whole
  fit=(--config conf/ant.yaml --trainer.accelerator gpu --data.learning_starts 5000)  # the defaults: no speed flags
  jax_env=(ENVS=Ant-v5 WIDTHS=2048 N_ITER=200)
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
fi

status=0
speed() {  # one speed table per group of compile modes, each its own JSON
  "$PY" benchmarks/throughput.py --only speed --device "$device" "${sizes[@]}" --compile "$@" "${tiny[@]}" \
    --out "$OUT/speed_$1.json" || status=1
}
echo "== 1. JAX anchor"
anchor=.device/anchor/jax_dime_update.py
[ -f "$anchor" ] || anchor=../shared/anchors/jax_dime_update.py
if [ -f "$anchor" ] && "$PY" -c "import jax, optax" 2>/dev/null; then
  env "${jax_env[@]}" XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" "$anchor" "$OUT/jax.json" || status=1
else
  echo "JAX anchor skipped: jax/optax or $anchor missing" | tee "$OUT/jax_skipped.txt"
fi
echo "== 2. speed table, eager and whole-step ($device)"
if [ "$update" = whole ]; then speed none whole; else speed none; fi
echo "== 3. real fit, the default (auto) modes"
"$PY" benchmarks/fit_speed.py --seconds "$seconds" --skip 10 --out "$OUT/fit.json" -- "${fit[@]}" || status=1
echo "== 4. speed table, compiled losses ($device)"
[ "$mode" = "--cpu-dry-run" ] || speed default reduce-overhead
"$PY" benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.md" || status=1
cat "$OUT/summary.md"
exit "$status"
