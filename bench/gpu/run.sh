#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (the target: H200, driver 580 / CUDA 13),
# Rust and the crates this workspace needs already there (no network: cargo runs offline unless
# CARGO_NET_OFFLINE=false). Writes everything under $OUT:
#   nvidia-smi.txt   nvidia-smi and nvidia-smi -q
#   env.txt          toolchain, CPU count, the NVRTC found
#   build.log        cargo build --release -p stevedore-kernels --features cuda
#   test.log         cargo test -p stevedore-kernels --features cuda --no-fail-fast -- --nocapture, with
#                    STEVEDORE_REQUIRE_GPU=1 and STEVEDORE_REQUIRE_NVRTC=1: a missing GPU or
#                    NVRTC fails instead of skipping
#   summary.txt      each step's exit status, the test result lines, and PASS or FAIL
# Every step runs even after one fails (its log is kept); the script exits 1 if any failed.
# NVRTC is looked for in $STEVEDORE_NVRTC_LIB_DIR, .venv-cuda/ (scripts/install-nvrtc.sh), the
# CUDA toolkit under /usr/local/cuda*, then the loader's cache. Takes about 2-4 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the directory for the logs}"
mkdir -p "$OUT"
export CARGO_NET_OFFLINE="${CARGO_NET_OFFLINE:-true}"
summary="$OUT/summary.txt"
: >"$summary"
failed=0

# step NAME LOG TIMEOUT_S COMMAND...: runs COMMAND with its output in LOG (and on the console),
# records its status.
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    echo "== $name: $*" | tee -a "$summary"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "   exit $rc after $((SECONDS - start)) s (log: $log)" | tee -a "$summary"
    [[ $rc == 0 ]] || failed=1
    return 0
}

step nvidia-smi "$OUT/nvidia-smi.txt" 60 bash -c 'nvidia-smi && nvidia-smi -q'

nvrtc_dir=""
for dir in "${STEVEDORE_NVRTC_LIB_DIR:-}" .venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib \
    /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/*/lib; do
    if [[ -n "$dir" ]] && compgen -G "$dir/libnvrtc.so*" >/dev/null; then
        nvrtc_dir=$(cd "$dir" && pwd)
        break
    fi
done
if [[ -n "$nvrtc_dir" ]]; then
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
{
    rustc -V
    cargo -V
    echo "cpus: $(nproc)"
    echo "NVRTC directory: ${nvrtc_dir:-none found here; relying on the loader cache}"
    ls -l "${nvrtc_dir:-/nonexistent}"/libnvrtc* 2>/dev/null
    ldconfig -p 2>/dev/null | grep -E 'libnvrtc|libcuda\.so' || echo "ldconfig: no libnvrtc or libcuda registered"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build "$OUT/build.log" 300 cargo build --release -p stevedore-kernels --features cuda
step test "$OUT/test.log" 420 env STEVEDORE_REQUIRE_GPU=1 STEVEDORE_REQUIRE_NVRTC=1 \
    cargo test -p stevedore-kernels --features cuda --no-fail-fast -- --nocapture

{
    echo "== test results"
    grep -E '^test result|skipped:|FAILED' "$OUT/test.log" || echo "no test result lines: see test.log"
} | tee -a "$summary"
if [[ $failed == 0 ]] && grep -q '^test result: ok' "$OUT/test.log" && ! grep -q 'skipped:' "$OUT/test.log"; then
    echo "PASS" | tee -a "$summary"
else
    echo "FAIL: see $summary and the logs beside it" | tee -a "$summary" >&2
    exit 1
fi
