"""The one loader of the compiled extension ``fastclip._C`` (sources in ``csrc/``).

Importing ``fastclip._C`` registers the op ``torch.ops.fastclip.attention_pool2d`` and the
class ``torch.classes.fastclip.BPE``. Everything that uses them asks this module, so a missing
build and a broken one are told apart the same way everywhere: a missing build is normal
(fastclip then runs its PyTorch code), a built library that does not load warns once.
"""

import importlib
import warnings


def _load():
    """Import ``fastclip._C``: ``(loaded, why not)``."""
    try:
        importlib.import_module("fastclip._C")
    except ModuleNotFoundError:
        return False, ("fastclip._C is not built; install with "
                       "`pip install --no-build-isolation -e .` to build it")
    except (ImportError, OSError) as error:
        # A built but unloadable library (an ABI or CUDA runtime mismatch) must not go unnoticed.
        warnings.warn(f"fastclip._C is built but does not load ({error}); fastclip runs its "
                      "PyTorch code instead. Rebuild with "
                      "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return False, f"fastclip._C does not load: {error}"
    return True, None


LOADED, ERROR = _load()


def has_kernel(op_name, dispatch_key):
    """Whether the extension registered a kernel of ``op_name`` for ``dispatch_key``."""
    import torch
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dispatch_key)


def native_class(name):
    """The class ``torch.classes.fastclip.<name>``, or None where the extension lacks it."""
    if not LOADED:
        return None
    import torch
    try:
        return getattr(torch.classes.fastclip, name)
    except (AttributeError, RuntimeError):
        return None
