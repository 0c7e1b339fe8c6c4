#!/bin/bash
# Train several bench_base_data arms at once on one machine (a GPU: three arms share an H100 in about
# 7-8 min for 12000 steps at batch 256), each capped at 2 CPU threads: without the cap every arm takes
# all cores and six arms on 16 cores ran 4x slower.
#
#   benchmarks/bench_base_data_arms.sh ARMS_FILE DATA_DIR OUT_DIR [BUDGET_SECONDS]
#
# ARMS_FILE: one arm per line, "name train-options", e.g.
#   16k_b256_lr4e-3 --n 16000 --batch 256 --lr 0.004
#   16k_b256_lr4e-3_seed1 --n 16000 --batch 256 --lr 0.004 --seed 1
# DATA_DIR: from `bench_base_data.py prepare`. Each arm's model lands in OUT_DIR/<name>, its log in
# OUT_DIR/<name>.log; score them here with `bench_base_data.py evaluate --cascade OUT_DIR/*/`.
# PARAMS (environment, default params.yaml) may point features.encoder.path at a local copy.
set -u
arms=${1:?arms file} data=${2:?data dir} out=${3:?out dir} budget=${4:-}
python=${PYTHON:-python3}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$out"
arms=$(realpath "$arms") data=$(realpath "$data") out=$(realpath "$out")  # before moving to the repo root
cd "$(dirname "$0")/.."
# text features once, before the arms start (they would all compute and write the same cache)
$python -c "
import sys; from pathlib import Path; sys.path.insert(0, '.')
from components.config import load_config
from benchmarks.bench_base_data import text_features
import torch
f = text_features(load_config(Path('${PARAMS:-params.yaml}')), Path('$data'), 'cuda' if torch.cuda.is_available() else 'cpu')
print('features', tuple(f['text'].shape))" || exit 1
pids=()
while read -r name options; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  # shellcheck disable=SC2086  # options are words by design
  $python benchmarks/bench_base_data.py --params "${PARAMS:-params.yaml}" train --data "$data" $options --threads 2 \
    ${budget:+--budget $budget} --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
done < "$arms"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for log in "$out"/*.log; do tail -n 1 "$log"; done
exit $status
