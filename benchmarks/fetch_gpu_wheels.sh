#!/usr/bin/env bash
# Download the wheels of the packages the GPU machine's image lacks (it has no registry) into
# benchmarks/wheels/ (not committed), for CPython 3.12 on manylinux x86-64; the GPU suite
# installs them with --no-index. Run it where pip reaches a registry, before the device call.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
mkdir -p wheels
for package in ftfy wcwidth open-clip-torch; do
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d wheels "$package"
done
ls wheels
