"""The GPU suite's check after the build: fastclip imports, its compiled extension has its
CUDA part, and the Triton backend runs a model on the GPU. Exits 1 with the reason otherwise,
so that no result is labelled fastclip when the kernels it names did not run.

    python benchmarks/check_install.py [--dry-run]   (--dry-run: on the CPU, imports only)
"""

import json
import sys


def main(argv):
    dry_run = "--dry-run" in argv
    try:
        import torch

        import fastclip
    except ImportError as error:
        print(f"check failed: fastclip does not import ({error}); install the wheels of "
              "benchmarks/wheels/ (benchmarks/fetch_gpu_wheels.sh downloads them)")
        return 1
    info = fastclip.info()
    print(json.dumps(info, indent=2))
    if dry_run:
        return 0
    problems = []
    if not info["extension"]["cuda"]:
        problems.append(f"fastclip._C has no CUDA kernels ({info['extension']['error']})")
    if not info["preprocess"].get("cuda"):
        problems.append(f"the preprocessing op has no CUDA kernel ({info['preprocess']})")
    try:
        model, _ = fastclip.load("random:tiny", device="cuda", backend="triton")
        with torch.no_grad():
            model.encode_image(torch.randn(2, 3, 64, 64, device="cuda"))
        torch.cuda.synchronize()
    except Exception as error:  # reported as the check's failure, with its type
        problems.append(f"the Triton backend does not run: {type(error).__name__}: {error}")
    for problem in problems:
        print(f"check failed: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
