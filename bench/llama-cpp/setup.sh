#!/usr/bin/env bash
# Sets up llama.cpp for bench/llama-cpp/compare.py in .venv-llama at the workspace root:
# llama-cpp-python built from source with native CPU flags, and the source distribution's vendored
# llama.cpp (convert_hf_to_gguf.py and gguf-py, with torch and transformers for the converter).
# Takes 10-20 minutes on two cores (the C++ build). Not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36
python3 -m venv .venv-llama
PIP=.venv-llama/bin/pip
CMAKE_ARGS="-DGGML_NATIVE=ON" "$PIP" install --no-cache-dir "llama-cpp-python==$VERSION" numpy
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION"
tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
rm -rf .venv-llama/llama.cpp
mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" .venv-llama/llama.cpp
"$PIP" install torch transformers sentencepiece ./.venv-llama/llama.cpp/gguf-py
echo "ready: .venv-llama/bin/python bench/llama-cpp/compare.py --model DIR"
