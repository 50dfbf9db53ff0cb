#!/usr/bin/env bash
# Write a GGUF file of a Hugging Face folder with llama.cpp's own converter (the copy that
# setup_venvs.sh llamacpp takes from the llama-cpp-python sdist), run with .venv-llamacpp:
#   serving/hf_to_gguf.sh FOLDER OUT.gguf [f32|f16|bf16|q8_0]
# The serving check uses it for the dense SmolLM2 baseline; moefy's own models go through
# `moefy export --format gguf`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
    echo "usage: serving/hf_to_gguf.sh FOLDER OUT.gguf [f32|f16|bf16|q8_0]" >&2
    exit 2
fi
CONVERTER=${CONVERTER:-.venv-llamacpp/llama.cpp-convert/convert_hf_to_gguf.py}
if [[ ! -f $CONVERTER ]]; then
    echo "error: $CONVERTER is missing: run serving/setup_venvs.sh llamacpp first" >&2
    exit 2
fi
partial="${2%.gguf}.partial.gguf"
nice -n "${NICE:-15}" "${PYTHON:-.venv-llamacpp/bin/python}" "$CONVERTER" "$1" --outtype "${3:-f32}" \
    --outfile "$partial" >/dev/null
mv "$partial" "$2"
