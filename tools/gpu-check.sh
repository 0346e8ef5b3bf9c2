#!/usr/bin/env bash
# The GPU checks in one short run, for a GPU machine lent for minutes: it needs only the CUDA build
# of albef (made on any machine: `eval "$(tools/cuda-toolchain.sh)" && cargo build --release
# --features cuda --target-dir target/cuda`) and the CUDA 13 runtime libraries (the nvidia-* wheels
# of the machine's PyTorch). Runs `albef selftest --device cuda` for fp32 and bf16: the reference's
# recorded training steps (fp32 within 1e-4, bf16 within 1e-2 on losses and 2e-2 on gradients), the
# fused ops on the device against their composed forms, the training runs, and the throughput bench
# of the full-size model (training samples/s, evaluation pairs/s, images/s, TFLOP/s, share of a
# dense matmul). Prints everything; exits non-zero if a check fails. About 2-4 minutes on an H200.
#
#     tools/gpu-check.sh [path/to/albef]     (default target/cuda/release/albef)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/cuda/release/albef}"
[ -x "$bin" ] || { echo "no CUDA build at $bin (see the comment at the top of $0)" >&2; exit 2; }
# The CUDA runtime libraries from the Python wheels, wherever pip put them.
libs="$(python3 - <<'PY' 2>/dev/null
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
dirs = []
for r in roots:
    for d in glob.glob(f"{r}/nvidia/*/lib") + glob.glob(f"{r}/nvidia/cu*/lib"):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${libs:+$libs:}${LD_LIBRARY_PATH:-}"
echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
echo "== albef $("$bin" --version)"
start=$(date +%s)
timeout 420 "$bin" selftest --device cuda --precision fp32,bf16 --bench-model base
rc=$?
echo "== gpu-check: exit $rc after $(( $(date +%s) - start )) s"
exit $rc
