#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs, from PyPI wheels, into .cuda/ (ignored),
# on a machine without a GPU or a CUDA install, and prints the environment to export:
#
#     eval "$(tools/cuda-toolchain.sh)" && cargo build --release --features cuda
#
# Every wheel is pinned to CUDA 13.0: the GPU machine's driver (580.x, CUDA 13.0) rejects PTX
# written by a newer nvcc, and unpinned dependencies pull 13.5. The build needs
# - nvcc (+ nvvm's cicc, crt and CCCL headers, cudart) for candle-kernels' .cu files, found through
#   PATH / CUDA_HOME (cudaforge), for CUDA_COMPUTE_CAP=90 (the H200; there is no nvidia-smi here);
# - libcuda, libnvrtc, libcurand, libcublas, libcublasLt, libcudart to link against (cudarc with
#   `dynamic-linking`, searched under CUDA_HOME/lib); CUDARC_CUDA_VERSION=13000 skips its
#   `nvcc --version` probe. No wheel ships the driver library, so a stub libcuda.so (soname
#   libcuda.so.1, every cu* symbol cudarc declares, no code) is generated; at run time the real
#   driver's libcuda.so.1 is loaded instead.
# With --nccl it also installs nvidia-nccl-cu13 (the multi-GPU build).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/.cuda"
home="$dir/nvidia/cu13"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.2.14
)
if [ "${1:-}" = "--nccl" ]; then
  wheels+=(nvidia-nccl-cu13==2.28.9)
fi
stamp="$dir/.installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the CUDA wheels" >&2; exit 1; }
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$dir" "${wheels[@]}" >&2
  # The wheels ship only versioned library names; the linker looks for lib<name>.so.
  for lib in "$home"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  # The driver API stub: one empty function per symbol cudarc's driver bindings declare.
  bindings="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/*.rs' 2>/dev/null || true)"
  if [ -z "$bindings" ]; then
    (cd "$root" && cargo fetch >&2)
    bindings="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/*.rs')"
  fi
  mkdir -p "$home/lib/stubs"
  grep -ho '\bfn cu[A-Za-z0-9_]*(' $bindings | sed 's/^fn //; s/($//' | sort -u |
    sed 's/.*/void &(void) {}/' >"$dir/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$dir/libcuda_stub.c"
  ln -sf stubs/libcuda.so "$home/lib/libcuda.so"
  touch "$stamp"
fi
if [ "${1:-}" = "--nccl" ]; then
  # nvidia-nccl-cu13 unpacks beside cu13/ (nvidia/nccl/lib/libnccl.so.2): linked from cu13/lib so
  # that the linker (cudarc's `dynamic-linking`) and LD_LIBRARY_PATH find it with the rest.
  ln -sf ../../nccl/lib/libnccl.so.2 "$home/lib/libnccl.so.2"
  ln -sf libnccl.so.2 "$home/lib/libnccl.so"
fi
cat <<EOF
export CUDA_HOME="$home"
export PATH="$home/bin:\$PATH"
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$home/lib:$home/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
