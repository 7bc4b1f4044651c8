#!/usr/bin/env bash
# Fixed runs whose output files must stay bit-identical across a refactor.
#
# Usage: bash benchmarks/fixed_runs.sh OUTDIR   (then compare OUTDIR/SHA256SUMS between trees)
# The sums are fixed_digest.py's: every tensor and setting, without the creation time and
# the training seconds that differ between any two runs.
# A jittered teacher, a second teacher, an augmented transfer set, a sharded top-k ensemble
# set, kd, top-k and mse students, exports, and the same path for a table (scikit-learn's
# wine) and a small colour-image folder. fp32 on the CPU, one thread, fixed seeds.
set -euo pipefail
out=${1:?usage: fixed_runs.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
py=${PYTHON:-python}
k() { "$py" -m kdcli "$@" --quiet; }
cd "$out"
d="mnist:train[:2000]"
c=(--precision fp32 --device cpu --seed 0 --force)
k train --data "$d" --hidden 128 --layers 2 --dropout 0.2 --jitter 2 --epochs 2 --eval-data none --out teacher.safetensors "${c[@]}"
k train --data "$d" --arch cnn:0.25 --epochs 1 --eval-data none --out teacher2.safetensors "${c[@]}"
k soft-targets teacher.safetensors --data "$d" --T 20 --jitter 2 --copies 2 --out transfer.safetensors "${c[@]}"
k soft-targets teacher.safetensors teacher2.safetensors --weights 0.6,0.4 --data "$d" --T 4 --top-k 3 --shard-size 100KB --out shards.index.json "${c[@]}"
k train-student --transfer transfer.safetensors --hidden 64 --epochs 1 --eval-data none --out kd.safetensors "${c[@]}"
k train-student --transfer shards.index.json --hidden 64 --epochs 1 --eval-data none --out topk.safetensors "${c[@]}"
k train-student --transfer transfer.safetensors --loss mse --hidden 64 --epochs 1 --eval-data none --out mse.safetensors "${c[@]}"
k export kd.onnx --model kd.safetensors --force
# A table: scikit-learn's wine with a string label column.
"$py" - <<'PY'
import csv
from sklearn.datasets import load_wine
w = load_wine()
with open("wine.csv", "w", newline="") as f:
    out = csv.writer(f)
    out.writerow([*w.feature_names, "kind"])
    for x, y in zip(w.data, w.target):
        out.writerow([*map(repr, x.tolist()), w.target_names[y]])
PY
t=(--label-column kind)
k train --data wine.csv "${t[@]}" --hidden 32 --epochs 30 --eval-data none --out wine-teacher.safetensors "${c[@]}"
k soft-targets wine-teacher.safetensors --data wine.csv "${t[@]}" --T 4 --out wine-transfer.safetensors "${c[@]}"
k train-student --transfer wine-transfer.safetensors "${t[@]}" --hidden 16 --epochs 30 --eval-data none --out wine-student.safetensors "${c[@]}"
k export wine-student.onnx --model wine-student.safetensors --data wine.csv "${t[@]}" --force
# A colour image folder: 3 classes of 8x8 tiles.
"$py" - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for k, name in enumerate(["red", "green", "blue"]):
    import os
    os.makedirs(f"tiles/{name}", exist_ok=True)
    for i in range(20):
        a = rng.integers(0, 90, size=(8, 8, 3), dtype=np.uint8)
        a[..., k] += 150
        Image.fromarray(a).save(f"tiles/{name}/{i}.png")
PY
k train --data tiles --arch cnn:0.25 --epochs 3 --eval-data none --out tiles-teacher.safetensors "${c[@]}"
k soft-targets tiles-teacher.safetensors --data tiles --T 4 --copies 1 --augment crop-flip --out tiles-transfer.safetensors "${c[@]}"
k train-student --transfer tiles-transfer.safetensors --hidden 16 --epochs 3 --eval-data none --out tiles-student.safetensors "${c[@]}"
k export tiles-student.onnx --model tiles-student.safetensors --data tiles --force
"$py" "$here/fixed_digest.py" ./*.safetensors ./*.onnx ./*.index.json | sort -u -k2 > SHA256SUMS
cat SHA256SUMS
