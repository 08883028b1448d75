# Sourced by the other scripts: creates .venv (once), installs torch, then fastclip in
# editable mode with its test and benchmark extras, compiling the fastclip._C extension
# (C++, and CUDA where a toolkit is found). Reinstalls only when the build inputs change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda
fi
stamp=.venv/.fastclip-build
# The build depends on these files and on the variables that choose the CUDA build.
inputs="$( (cat pyproject.toml setup.py $(find csrc -type f 2>/dev/null | sort);
            echo "FASTCLIP_CUDA=${FASTCLIP_CUDA:-} CUDA_HOME=${CUDA_HOME:-}") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch torchvision
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[test,bench]"
  echo "$inputs" > "$stamp"
fi
