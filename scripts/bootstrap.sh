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
  echo "Installing fastclip into .venv (torch, then fastclip, compiling fastclip._C; log in .venv/install.log)..."
  {
    python -m pip install --upgrade pip &&
    python -m pip install torch torchvision &&
    MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --no-build-isolation -e ".[test,bench,lint]"
  } > .venv/install.log 2>&1 || { tail -n 40 .venv/install.log; echo "Installation failed; see .venv/install.log" >&2; exit 1; }
  echo "$inputs" > "$stamp"
fi
