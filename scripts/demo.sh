#!/usr/bin/env bash
# Set up ./.venv, build a small GPT-J checkpoint (no Hub needed), convert it to int8,
# verify it against the original, and show what came out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
mkdir -p demo
.venv/bin/python scripts/make_demo_checkpoint.py demo/tiny-gptj
echo
echo "== int8 convert demo/tiny-gptj"
.venv/bin/int8 convert demo/tiny-gptj --out demo/tiny-gptj-int8 --overwrite
echo
echo "== int8 verify demo/tiny-gptj-int8 --against demo/tiny-gptj"
.venv/bin/int8 verify demo/tiny-gptj-int8 --against demo/tiny-gptj --json demo/verify.json
echo
echo "== the converted folder"
ls -l demo/tiny-gptj-int8
echo
echo "== loaded by plain transformers (compressed-tensors), int8 weights in memory until the first forward"
.venv/bin/python - <<'PY'
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("demo/tiny-gptj-int8")
layer = model.transformer.h[0].attn.q_proj
print({name: (str(p.dtype), tuple(p.shape)) for name, p in layer.named_parameters()})
tok = AutoTokenizer.from_pretrained("demo/tiny-gptj-int8")
ids = tok("The int8 demo says", return_tensors="pt").input_ids
print("logits finite:", bool(model(ids).logits.isfinite().all()))
PY
