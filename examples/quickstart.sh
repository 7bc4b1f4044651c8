#!/usr/bin/env bash
# kdcli end to end on the bundled MNIST, in a few minutes on 2 CPU cores:
# a teacher, a hard-label baseline, soft targets, a distilled student, ONNX export, evaluation.
# Outputs go to ./quickstart/. --epochs N sets the students' epochs (default 15); the teacher,
# regularized by dropout and jitter, trains for a few times longer.
set -euo pipefail
epochs=15
if [ "${1:-}" = "--epochs" ]; then epochs=$2; fi
teacher_epochs=$(( epochs * 8 / 3 ))
mkdir -p quickstart
cd quickstart

echo "== 1/6 teacher: 784-1200-1200-10, dropout, max-norm, jittered inputs"
kdcli train --data mnist --hidden 1200 --layers 2 --dropout 0.5 --input-dropout 0.2 \
  --max-norm 3 --jitter 2 --epochs "$teacher_epochs" --out teacher.safetensors \
  --force

echo "== 2/6 baseline: 784-300-300-10 on hard labels"
kdcli train --data mnist --hidden 300 --layers 2 --epochs "$epochs" \
  --out baseline.safetensors --force

echo "== 3/6 soft targets at T=20 on the training set and 2 copies shifted by up to 2 pixels"
kdcli soft-targets teacher.safetensors --T 20 --jitter 2 --copies 2 --out transfer.safetensors \
  --force

echo "== 4/6 student: the same 784-300-300-10, distilled"
kdcli train-student --hidden 300 --alpha 0.1 --epochs "$epochs" \
  --transfer transfer.safetensors --out student.safetensors --force

echo "== 5/6 export the student to ONNX (verified against torch)"
kdcli export student.onnx --model student.safetensors --force

echo "== 6/6 evaluate on the 10,000 MNIST test digits"
kdcli eval teacher.safetensors baseline.safetensors student.safetensors student.onnx \
  --data mnist:test
