#!/usr/bin/env bash
# Hugging Face transformers on the checkpoints `llama2` writes: a pretraining checkpoint over
# Llama 2's tokenizer, an SFT checkpoint over a trained 512-token tokenizer, and a reward model,
# each checked by scripts/hf_check.py (files, AutoTokenizer's special tokens, apply_chat_template
# against `llama2 tokenize --chat`). transformers (no torch) is installed into a venv under
# target/; where torch is importable there too (pip install torch), the models are also loaded
# and run (--models).
#   usage: scripts/hf-check.sh [path/to/llama2]      (LLAMA2_SHARED as for the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
L="${1:-target/release/llama2}"
S="${LLAMA2_SHARED:-$(cd .. && pwd)/shared}"
VENV="${LLAMA2_HF_VENV:-$PWD/target/hf-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import transformers, jinja2' 2>/dev/null ||
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check transformers jinja2
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
head -c 200000 "$S/data/tinyshakespeare.txt" > "$W/small.txt"
head -n 40 "$S/data/hh-harmless-pairs.jsonl" > "$W/pairs.jsonl"
q() { "$@" > "$W/log" 2>&1 || { cat "$W/log"; exit 1; }; }
latest() { echo "$1/checkpoints/$(cat "$1/checkpoints/latest")"; }

# Llama 2's tokenizer: pretraining, then a reward model from it.
q "$L" prepare-data --tokenizer "$S/tokenizer/llama2/tokenizer.json" --out "$W/data" --val-fraction 0.1 "$W/small.txt"
q "$L" pretrain --data "$W/data" --out "$W/pt" --preset tiny --seq-len 32 --batch-size 2 --steps 2 --no-progress
q "$L" train-rm --init "$(latest "$W/pt")" --data "$W/pairs.jsonl" --out "$W/rm" --batch-size 8 --max-steps 1 --seq-len 64
# A trained tokenizer: pretraining and SFT on the pairs' chosen answers.
q "$L" train-tokenizer --vocab-size 512 --out "$W/tok.json" "$W/small.txt"
q "$L" prepare-data --tokenizer "$W/tok.json" --out "$W/data2" --val-fraction 0.1 "$W/small.txt"
q "$L" pretrain --data "$W/data2" --out "$W/pt2" --preset tiny --seq-len 32 --batch-size 2 --steps 2 --no-progress
q "$L" sft --init "$(latest "$W/pt2")" --data "$W/pairs.jsonl" --out "$W/sft" --seq-len 128 --batch-size 2 --steps 1 --no-progress

models=()
"$VENV/bin/python" -c 'import torch' 2>/dev/null && models=(--models)
"$VENV/bin/python" scripts/hf_check.py --llama2 "$L" "${models[@]}" \
  "$(latest "$W/pt")" "$(latest "$W/sft")" "$W/rm/model"
