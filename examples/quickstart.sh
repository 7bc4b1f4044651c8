#!/usr/bin/env bash
# kdcli end to end on the bundled MNIST in about a minute and a half on 2 CPU cores.
#
# The paper's story on a small labelled set: 10,000 labelled digits train a large teacher
# (regularized by dropout, max-norm and jittered inputs) and a small 784-300-300-10 net on
# hard labels (the student's twin). The teacher then labels the same 10,000 digits and 4
# copies shifted by up to 2 pixels at T = 20, the same small net is distilled from those soft
# targets, exported to ONNX (checked against torch), and all are counted on the 10,000 test
# digits. Outputs go to ./quickstart/.
#
# Options: --device auto|cpu|cuda (default auto), --precision auto|fp32|bf16 (default auto:
# bf16 where the CPU or GPU has bf16 units), --seed N (default 0), --epochs N (the student's
# and twin's epochs are scaled from it; default 8).
set -euo pipefail
device=auto precision=auto seed=0 epochs=8
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    *) echo "quickstart.sh: unknown option $1 (see the comments at its top)" >&2; exit 2 ;;
  esac
done
teacher_epochs=$(( epochs * 15 / 4 ))
twin_epochs=$(( epochs * 5 / 2 ))
data="mnist:train[:10000]"
# Step 6 counts every model's test errors once; per-epoch evaluations would add a third to
# the teacher's time.
common=(--device "$device" --precision "$precision" --seed "$seed" --eval-data none --force)
mkdir -p quickstart
cd quickstart

echo "== 1/6 teacher: 784-800-800-10 on 10,000 labelled digits (dropout, max-norm, jitter)"
kdcli train --data "$data" --hidden 800 --layers 2 --dropout 0.5 --input-dropout 0.2 \
  --max-norm 3 --jitter 2 --epochs "$teacher_epochs" --out teacher.safetensors "${common[@]}"

echo "== 2/6 twin: 784-300-300-10 on the same 10,000 digits, hard labels"
kdcli train --data "$data" --hidden 300 --layers 2 --epochs "$twin_epochs" \
  --out twin.safetensors "${common[@]}"

echo "== 3/6 soft targets at T=20 on the 10,000 digits and 4 copies shifted by up to 2 pixels"
kdcli soft-targets teacher.safetensors --data "$data" --T 20 --jitter 2 --copies 4 \
  --out transfer.safetensors --device "$device" --precision "$precision" --seed "$seed" --force

echo "== 4/6 student: the same 784-300-300-10, distilled"
kdcli train-student --hidden 300 --alpha 0.1 --epochs "$epochs" \
  --transfer transfer.safetensors --out student.safetensors "${common[@]}"

echo "== 5/6 export the student to ONNX (verified against torch)"
kdcli export student.onnx --model student.safetensors --force

echo "== 6/6 evaluate on the 10,000 MNIST test digits"
kdcli eval teacher.safetensors twin.safetensors student.safetensors student.onnx \
  --data mnist:test
