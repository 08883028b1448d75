"""Build script. The package metadata lives in pyproject.toml; this file exists to build the
compiled extension ``fastclip._C`` (C++ always, CUDA when a toolkit is found).

- The extension needs torch at build time: install with ``pip install --no-build-isolation -e .``.
  Under pip's build isolation torch is absent, and fastclip installs without the extension
  (attention pooling then runs its PyTorch fallback).
- ``FASTCLIP_CUDA=1`` requires the CUDA kernels, ``FASTCLIP_CUDA=0`` skips them; unset, they
  are built when a CUDA toolkit (``CUDA_HOME``, or ``nvcc`` on the PATH) and a CUDA build of
  torch are found.
- ``MAX_JOBS`` limits ninja's parallel compiles; ``TORCH_CUDA_ARCH_LIST`` picks the GPU
  architectures (default: the visible GPUs', or ``DEFAULT_CUDA_ARCHS`` when none is visible).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

SOURCES = ["csrc/attention_pool.cpp", "csrc/bpe.cpp", "csrc/resize.cpp"]
CUDA_SOURCES = ["csrc/attention_pool_cuda.cu", "csrc/resize_cuda.cu"]
# Rebuild when they change; ship them in source archives.
HEADERS = ["csrc/attention_pool.h", "csrc/resize.h", "csrc/resize_kernels.h", "csrc/resize_op.h"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100 and H100/H200 natively, newer GPUs through PTX


def say(message):
    print(f"fastclip setup: {message}", file=sys.stderr)


def find_cuda_home():
    """The CUDA toolkit's root, or None. ``nvcc`` may be installed apart from the toolkit (as
    /usr/local/bin/nvcc), so its parent folder is only trusted when it holds the headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def nvidia_include_dirs():
    """Headers ATen's CUDA code includes (cublas_v2.h, cusparse.h, ...) that torch's pip
    dependencies install under site-packages/nvidia/*/include rather than in the toolkit."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(folder for root in nvidia.__path__
                  for folder in glob.glob(os.path.join(root, "*", "include")))


def want_cuda(cuda_home, torch):
    choice = os.environ.get("FASTCLIP_CUDA", "").strip()
    if choice == "0":
        return False
    found = cuda_home is not None and torch.version.cuda is not None
    if choice == "1" and not found:
        raise RuntimeError(
            "FASTCLIP_CUDA=1 but no CUDA build is possible: "
            + ("torch is a CPU-only build; install a CUDA build of torch."
               if torch.version.cuda is None else
               "no CUDA toolkit found; set CUDA_HOME to its root (the folder with bin/nvcc "
               "and include/cuda_runtime.h)."))
    return found


def extensions():
    """(ext_modules, cmdclass) for fastclip._C, or nothing when torch is not importable."""
    try:
        import torch
    except ImportError:
        say("torch is not importable at build time (pip's build isolation?), so the compiled "
            "extension fastclip._C is not built and attention pooling will use its PyTorch "
            "fallback. To build it: pip install --no-build-isolation -e .")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    cuda = want_cuda(cuda_home, torch)
    from torch.utils import cpp_extension

    # torch's build helpers choose the C++ standard. No fused multiply-adds may be contracted
    # from separate ones: the resize weights must round as Pillow's do (csrc/resize.h).
    compile_args = {"cxx": ["-O3", "-ffp-contract=off"]}
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        compile_args["nvcc"] = ["-O3", "-Xcompiler", "-ffp-contract=off", "--fmad=false"]
        extension = cpp_extension.CUDAExtension(
            "fastclip._C", SOURCES + CUDA_SOURCES, include_dirs=nvidia_include_dirs(),
            depends=HEADERS, extra_compile_args=compile_args)
    else:
        extension = cpp_extension.CppExtension(
            "fastclip._C", SOURCES, depends=HEADERS, extra_compile_args=compile_args)
    where = (f" (CUDA_HOME={cuda_home}, archs "
             f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})") if cuda else ""
    say(f"building fastclip._C with {'CPU and CUDA' if cuda else 'CPU'} kernels{where}")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
