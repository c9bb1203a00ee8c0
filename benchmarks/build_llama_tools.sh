#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix, llama-quantize and llama-perplexity (and, with WITH_SERVER=1,
# llama-server) from the llama.cpp sources vendored in the llama-cpp-python sdist (the same version
# quantkit runs through), for the peer benchmarks.
# Output: $QUANTKIT_CACHE/llama-tools/bin/{llama-imatrix,llama-quantize,llama-perplexity[,llama-server]}
# (~10 min on 2 cores; the server adds a few minutes).
set -euo pipefail
VER=${LLAMA_CPP_PYTHON_VERSION:-$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
ROOT=${QUANTKIT_CACHE:-$HOME/.cache/quantkit}/llama-tools
TARGETS="llama-imatrix llama-quantize llama-perplexity"
SERVER=OFF
if [ "${WITH_SERVER:-0}" = 1 ]; then TARGETS="$TARGETS llama-server"; SERVER=ON; fi
missing=0
for t in $TARGETS; do [ -x "$ROOT/bin/$t" ] || missing=1; done
if [ $missing = 0 ]; then echo "$ROOT/bin"; exit 0; fi
mkdir -p "$ROOT/src"
if [ ! -d "$ROOT/src/llama_cpp_python-$VER" ]; then
  pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$ROOT/src"
  tar -xzf "$ROOT/src/llama_cpp_python-$VER.tar.gz" -C "$ROOT/src"
fi
SRC="$ROOT/src/llama_cpp_python-$VER/vendor/llama.cpp"
cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=$SERVER -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$ROOT/build" -j "${JOBS:-2}" --target $TARGETS
mkdir -p "$ROOT/bin"
for t in $TARGETS; do cp "$ROOT/build/bin/$t" "$ROOT/bin/"; done
echo "$ROOT/bin"
