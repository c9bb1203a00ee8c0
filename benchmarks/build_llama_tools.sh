#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix and llama-quantize from the llama.cpp sources vendored in the
# llama-cpp-python sdist (the same version quantkit runs through), for the peer benchmarks.
# Output: $QUANTKIT_CACHE/llama-tools/bin/{llama-imatrix,llama-quantize} (~10 min on 2 cores).
set -euo pipefail
VER=${LLAMA_CPP_PYTHON_VERSION:-$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
ROOT=${QUANTKIT_CACHE:-$HOME/.cache/quantkit}/llama-tools
if [ -x "$ROOT/bin/llama-imatrix" ] && [ -x "$ROOT/bin/llama-quantize" ]; then echo "$ROOT/bin"; exit 0; fi
mkdir -p "$ROOT/src"
if [ ! -d "$ROOT/src/llama_cpp_python-$VER" ]; then
  pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$ROOT/src"
  tar -xzf "$ROOT/src/llama_cpp_python-$VER.tar.gz" -C "$ROOT/src"
fi
SRC="$ROOT/src/llama_cpp_python-$VER/vendor/llama.cpp"
cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$ROOT/build" -j "${JOBS:-2}" --target llama-imatrix llama-quantize llama-perplexity
mkdir -p "$ROOT/bin"
cp "$ROOT/build/bin/llama-imatrix" "$ROOT/build/bin/llama-quantize" "$ROOT/build/bin/llama-perplexity" "$ROOT/bin/"
echo "$ROOT/bin"
