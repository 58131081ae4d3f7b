#!/usr/bin/env bash
# Installs NVIDIA's NVRTC for CUDA 13.0 from PyPI into .venv-cuda/ (git-ignored), so that the
# CUDA kernels can be compiled (and the NVRTC test run) on a machine without a GPU or a CUDA
# toolkit. Prints the library directory to put on LD_LIBRARY_PATH. The kernels include no
# headers, so no CUDA headers are installed.
#
#   scripts/install-nvrtc.sh
#   export LD_LIBRARY_PATH="$(scripts/install-nvrtc.sh --print-lib-dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#   cargo test -p stevedore-kernels --features cuda --test nvrtc
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-cuda
# 13.0.x: the CUDA version cudarc's bindings are built for (feature cuda-13000); a newer NVRTC
# also compiles the kernels, but its PTX may be too new for a CUDA 13.0 driver.
wheel='nvidia-cuda-nvrtc==13.0.*'

lib_dir() {
    find "$PWD/$venv" -name 'libnvrtc.so.13' -printf '%h\n' 2>/dev/null | head -n 1
}

if [[ "${1:-}" == --print-lib-dir ]]; then
    dir=$(lib_dir)
    [[ -n "$dir" ]] || { echo "install-nvrtc: no libnvrtc.so.13 under $venv: run scripts/install-nvrtc.sh" >&2; exit 1; }
    echo "$dir"
    exit 0
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
dir=$(lib_dir)
[[ -n "$dir" ]] || { echo "install-nvrtc: $wheel installed, but no libnvrtc.so.13 under $venv" >&2; exit 1; }
"$venv/bin/python" -m pip show nvidia-cuda-nvrtc | grep -E '^(Name|Version):' >&2
echo "library directory: $dir" >&2
echo "include directory: none needed (the kernels include no headers)" >&2
echo "export LD_LIBRARY_PATH=$dir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" >&2
