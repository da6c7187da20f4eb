#!/bin/bash
# The whole GPU benchmark in one call (issue 3): random-weight Qwen2.5-1.5B and SmolLM2-135M shapes, every
# variant of benchmarks/local_throughput.py; tables on stdout, JSON lines in $OUT/results.jsonl, log in $OUT/log.txt.
#
# Needs (carried): .whl/ (xgrammar, apache-tvm-ffi, pydantic & deps for python 3.12), .models/smollm2-tok/ (the
# embedded model's tokenizer) and .models/qwen-tok/ (the Qwen2.5 vocabulary, from benchmarks/make_qwen_tokenizer.py).
# Sizes come from the environment so a CPU dry run can shrink them:
#   DEVICE=cpu SHAPES=smollm2-135m NAIVE=1 GEN=2 BATCHES=4 PAIRS=8 NEW=4 PROMPT=40 bash benchmarks/gpu/run.sh
# ADMIT (e.g. 0.125,0.5,1) repeats the backend rows at each engine admit_fraction (default: the engine's own).
# EXTRA (default profile,generate-batch,static-compile) adds, for the Qwen shape only, a torch.profiler table of one
# engine batch and transformers' own fast paths (static-compile compiles for ~40-55 s, at the largest of GEN only).
set -o pipefail
OUT=${OUT:-/tmp/polytask-gpu-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; SHAPES=${SHAPES:-"qwen2.5-1.5b smollm2-135m"}
NAIVE=${NAIVE:-4}; GEN=${GEN:-64,256,1024}; BATCHES=${BATCHES:-256,1024}; PAIRS=${PAIRS:-4096}
NEW=${NEW:-32}; PROMPT=${PROMPT:-120}; LIMIT=${LIMIT:-160}; QLIMIT=${QLIMIT:-300}; ADMIT=${ADMIT:-}
VARIANTS=${VARIANTS:-naive,generate,polytask,static-json,backend-json,backend-enum}; EXTRA=${EXTRA-profile,generate-batch,static-compile}
if [ "$DEVICE" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
# polytask's own modules without its package __init__ (which imports the OpenAI stack, absent there)
rm -rf /tmp/pt && mkdir -p /tmp/pt && cp -r src/polytask /tmp/pt/ && : > /tmp/pt/polytask/__init__.py \
  && : > /tmp/pt/polytask/backends/__init__.py
export PYTHONPATH=/tmp/pt${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
$PY -c "import torch, transformers, xgrammar, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'xgrammar', m.version('xgrammar'), 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$OUT/log.txt"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee -a "$OUT/log.txt"
for shape in $SHAPES; do
  tokdir=.models/smollm2-tok; limit=$LIMIT; variants=$VARIANTS
  if [ "$shape" = qwen2.5-1.5b ]; then
    limit=$QLIMIT; variants=$VARIANTS${EXTRA:+,$EXTRA}
    if [ -d .models/qwen-tok ]; then tokdir=.models/qwen-tok; else echo "# no .models/qwen-tok: SmolLM2 tokenizer" | tee -a "$OUT/log.txt"; fi
  fi
  timeout "$limit" $PY benchmarks/local_throughput.py --model "$shape" --device "$DEVICE" --tokenizer "$tokdir" \
    --naive-pairs "$NAIVE" --generate-batches "$GEN" --batches "$BATCHES" --pairs "$PAIRS" --new-tokens "$NEW" \
    --prompt-tokens "$PROMPT" --variants "$variants" ${ADMIT:+--admit-fractions "$ADMIT"} --out "$OUT/results.jsonl" 2>&1 | grep -v "Loading weights" | tee -a "$OUT/log.txt"
  echo "# $shape exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
done
echo "# summary"; cat "$OUT/results.jsonl" 2>/dev/null | $PY -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(f\"{r['model']:>14} {r['variant']:>14} B={r['batch']:>5} {r['tokens_per_s']:>10} tok/s {r['pairs_per_s']:>9} pairs/s mem={r['gpu_mem_gib']} graphs={r.get('graphs','')} parsed={r.get('parsed','')} cut={r.get('length_cut','')} prefill_ms={r.get('prefill_ms','')} decode_ms={r.get('decode_ms','')} first={r.get('first_call_s','')}\")"
