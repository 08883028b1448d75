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
stamp=.venv/.fastclip-build
inputs="$(cat pyproject.toml setup.py $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch torchvision
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[test,bench]"
  echo "$inputs" > "$stamp"
fi
