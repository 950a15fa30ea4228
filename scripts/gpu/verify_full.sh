#!/usr/bin/env bash
# Wall time of `nsa verify --scale full` on N GPUs of one host (issue 4: under 15 minutes on one
# H200; on two, at most 0.6x of that). Run from the project root on the GPU machine, with `.whl/`
# carried (../shared/tools/gpu-wheels.sh):
#   scripts/gpu/verify_full.sh GPUS LIMIT_SECONDS [nsa verify options and suites ...]
# The run is stopped with SIGTERM at LIMIT_SECONDS (the runner then writes what finished). Under
# $OUT: verify-<N>gpu.log, .parquet (the run's table: `run=<id>` directories do not travel back),
# .csv and .json (nsa report export).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled
gpus=$1 limit=$2
shift 2
out=${OUT:-reports}
reports=/tmp/verify-reports-${gpus}gpu
name=$out/verify-${gpus}gpu
start=$(date +%s)
CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) timeout -s TERM -k 30 "$limit" \
  python3 -m cli.main verify --scale full --out "$reports" "$@" > "$name.log" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))
run=$(ls -td "$reports"/run=* 2>/dev/null | head -1)
if [ -n "$run" ]; then
  cp "$run/results.parquet" "$name.parquet"
  python3 -m cli.main report export "${run##*=}" --out "$reports" --format csv --output "$name.csv" >/dev/null 2>&1
  python3 -m cli.main report export "${run##*=}" --out "$reports" --format json --output "$name.json" >/dev/null 2>&1
fi
tail -45 "$name.log"
echo "verify --scale full on $gpus GPU(s): exit $rc, ${wall}s wall (limit ${limit}s)"
