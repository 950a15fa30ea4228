#!/usr/bin/env bash
# Several `nsa train` runs at once, one per GPU of the host (issue 6: NSA and its dense twin, or
# two NSA settings, inside one 10-minute command). Run from the project root on the GPU machine,
# with `.whl/` carried (../shared/tools/gpu-wheels.sh):
#   scripts/gpu/train_runs.sh LIMIT_SECONDS NAME="nsa train options" [NAME="options" ...]
# Run i trains on GPU i with `--out /tmp/nsa-train/NAME`: outside the repository copy, which the
# device tool replaces when a later command carries a fresh snapshot, so the run stays on the
# machine while it is held (a later leg passes `--resume`, a dense twin `--replay /tmp/nsa-train/OTHER`),
# logs to $OUT/NAME.log, and is stopped with SIGTERM at LIMIT_SECONDS. When all have ended (waited
# for with `wait`, never by polling for a process pattern, which can match the waiting shell
# itself), each run's tables, plots, summary and finished weights (weights_<model>.pt) are copied
# to $OUT/NAME/ without checkpoints.
# Example:
#   scripts/gpu/train_runs.sh 590 \
#     frozen8k="--model nsa --context 8192 --gate-lr-scale 0 --minutes 19 --leg-minutes 8" \
#     plain8k="--model nsa --context 8192 --minutes 19 --leg-minutes 8"
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled
limit=$1
shift
out=${OUT:-reports/train-logs}
runs=/tmp/nsa-train
mkdir -p "$out" "$runs"
names=() pids=()
gpu=0
for run in "$@"; do
  name=${run%%=*} options=${run#*=}
  if [ "$name" = "$run" ] || [ -z "$name" ]; then
    echo "train_runs.sh: each run is NAME=\"options\", got: $run" >&2
    exit 2
  fi
  # shellcheck disable=SC2086  # the options are a word list on purpose
  CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM -k 30 "$limit" \
    python3 -m cli.main train $options --out "$runs/$name" > "$out/$name.log" 2>&1 &
  names+=("$name") pids+=($!)
  gpu=$((gpu + 1))
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  name=${names[$i]}
  mkdir -p "$out/$name"
  tar -C "$runs/$name" --exclude=checkpoints -cf - . | tar -xf - -C "$out/$name"
  echo "== $name: exit $rc"
  tail -25 "$out/$name.log"
done
exit $status
