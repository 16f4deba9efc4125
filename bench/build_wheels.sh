#!/usr/bin/env bash
# The Python 3.12 wheels a GPU machine lacks (its image has torch, transformers, numpy, pyarrow,
# einops, rich, safetensors, tokenizers, matplotlib, but not these), downloaded here into .whl/
# (gitignored) so they travel with the working tree: `bench/gpu_check.sh` installs them there.
# No dependencies are resolved (--no-deps): the list below is every package the GPU check imports
# that the image lacks. transformers-stream-generator (TransformerLens' declared dependency) has no
# wheel and TransformerLens imports it only for one model family, so it stays behind.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    duckdb lark interegular prompt_toolkit wcwidth pydantic pydantic-core annotated-types
    typing-inspection transformer-lens beartype fancy-einsum typeguard datasets dill multiprocess
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
mkdir -p .whl
for name in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" -d .whl "$name" 2>&1 | grep -v "WARNING: Location" || true
done
size=$(du -sm .whl | cut -f1)
echo "wheels in .whl: $(ls .whl | wc -l) files, ${size} MiB (the working tree that travels must stay under 64 MiB)"
