"""The weights of a TorchScript archive, read without running any of its code.

``torch.jit.load`` compiles an archive's code and runs it: a class's ``__setstate__`` executes
while the archive loads. OpenAI's releases are TorchScript archives, so fastclip reads them
the way ``torch.load(..., weights_only=True)`` reads ordinary checkpoints: the pickled module
tree (``data.pkl``) goes through an unpickler that builds only tensors, plain containers and
inert placeholders for the archive's module classes. Which attributes are parameters and
buffers is read from the class declarations in the archive's ``code/`` files, as text.
Anything else an archive asks for is refused, with the name of what it asked for.
"""

import collections
import io
import pickle
import re
import zipfile

import torch

# The storage types of torch's pickles, by name.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n?)*)", re.MULTILINE)
_NAMES = re.compile(r"^  __(parameters|buffers)__ = \[([^\]]*)\]", re.MULTILINE)


# Weights barely compress: a storage that expands more than this (and is large) is a bomb.
MAX_COMPRESSION_RATIO = 100
MAX_COMPRESSION_SPAN = 64 << 20


class ArchiveError(ValueError):
    """A TorchScript archive that fastclip will not read: the message says why."""


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _Module:
    """Stands for one of the archive's module classes: it only keeps its pickled state."""
    qualified_name = None

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ArchiveError(
                f"the archive's class {self.qualified_name} has a custom state "
                f"({type(state).__name__}); fastclip reads only plain modules' weights")
        self.state = state


def _rebuild_tensor(flat, offset, size, stride, requires_grad=False, hooks=None, *_):
    return flat.as_strided(size, stride, offset)


def _module_declarations(archive, root):
    """``{qualified class name: its parameter and buffer names}``, from the ``code/`` files."""
    declared = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix):-len(".py")].replace("/", ".")
        source = archive.read(name).decode("utf-8", errors="replace")
        for match in _CLASS.finditer(source):
            names = set()
            for _, listed in _NAMES.findall(match.group(2)):
                names.update(n.strip().strip('"') for n in listed.split(",") if n.strip())
            declared[f"{module}.{match.group(1)}"] = names
    return declared


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, archive, root):
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root
        self.classes = {}
        self.storages = {}  # key -> its flat tensor: each storage is read once

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_Module,), {"qualified_name": qualified})
            return self.classes[qualified]
        raise ArchiveError(f"the archive asks for {module}.{name}, which is neither a tensor "
                           "nor one of its own modules; fastclip does not run or build it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ArchiveError(f"the archive refers to an unknown object {pid!r:.80}")
        _, storage_type, key, _, numel = pid
        dtype = storage_type.dtype
        if key in self.storages:
            flat = self.storages[key]
            if flat.dtype != dtype or flat.numel() != numel:
                raise ArchiveError(f"storage {key} is named with two different types")
            return flat
        member = f"{self.root}/data/{key}"
        info = self.archive.getinfo(member)
        # Sizes are checked before the bytes are read, so a lying member costs nothing.
        if info.file_size != numel * dtype.itemsize:
            raise ArchiveError(f"storage {key} holds {info.file_size} bytes, not the "
                               f"{numel * dtype.itemsize} its header gives")
        if info.file_size > MAX_COMPRESSION_SPAN and \
                info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise ArchiveError(f"storage {key} expands {info.compress_size} bytes into "
                               f"{info.file_size}, far more than weights ever compress")
        data = bytearray(self.archive.read(member))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        self.storages[key] = flat
        return flat


def _collect(module, declared, prefix, out):
    names = declared.get(module.qualified_name)
    if names is None:
        raise ArchiveError(f"the archive has no declaration of its class "
                           f"{module.qualified_name}")
    for attribute, value in module.state.items():
        if isinstance(value, _Module):
            _collect(value, declared, f"{prefix}{attribute}.", out)
        elif attribute in names and isinstance(value, torch.Tensor):
            out[prefix + attribute] = value


def read_weights(path):
    """The parameters and buffers of the TorchScript archive at ``path``, as a state dict
    (the keys ``torch.jit.load(path).state_dict()`` would give). Raises ``ArchiveError``."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ArchiveError("it has no single data.pkl at its top level")
        root = pickles[0].split("/")[0]
        if f"{root}/byteorder" in archive.namelist() and \
                archive.read(f"{root}/byteorder").strip() not in (b"little", b""):
            raise ArchiveError("its tensors are stored big-endian")
        declared = _module_declarations(archive, root)
        top = _Unpickler(archive.read(pickles[0]), archive, root).load()
    if not isinstance(top, _Module):
        raise ArchiveError(f"its data.pkl holds a {type(top).__name__}, not a module")
    weights = {}
    _collect(top, declared, "", weights)
    return weights
