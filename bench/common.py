"""What the benchmarks share: the mixers they measure (with the overhead each may add, as a
fraction of a ResNet-50 training step), the batch they measure them on, a counter of the
host-device synchronisations a step would make on a GPU, and a folder of real photographs as
ImageNet JPEGs."""
import statistics
import traceback
from pathlib import Path

import skimage.data
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from pretrain.config import IMAGENET_MEAN, IMAGENET_STD

BENCH_MIXERS = {  # label -> (build_mixer arguments, allowed overhead or None)
    "none": (dict(name="none"), None),
    "cutout": (dict(name="cutout"), None),
    "mixup": (dict(name="mixup"), None),
    "cutmix": (dict(name="cutmix"), None),
    "saliencymix box=batch": (dict(name="saliencymix", box="batch", mean=IMAGENET_MEAN, std=IMAGENET_STD), 0.01),
    "saliencymix box=sample": (dict(name="saliencymix", box="sample", mean=IMAGENET_MEAN, std=IMAGENET_STD), 0.02),
}


PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
JPEG_SIZE, JPEG_QUALITY = (500, 375), 95  # ImageNet's most common size; its JPEGs average about 110 KB


def write_photographs(root: Path, images: int) -> float:
    """``root/train/n00000000/`` with ``images`` JPEGs (scikit-image's photographs in turn, each
    file encoded on its own); their mean size in KB."""
    folder = root / "train" / "n00000000"
    folder.mkdir(parents=True)
    photographs = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(JPEG_SIZE)
                   for name in PHOTOGRAPHS]
    for index in range(images):
        photographs[index % len(photographs)].save(folder / f"{index:05d}.JPEG", quality=JPEG_QUALITY)
    return statistics.mean(path.stat().st_size for path in folder.iterdir()) / 1000


def synchronise(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer reads what it did (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels as the training loader hands them to a mixer (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# ------------------------------------------------------------------ host-device synchronisations

_DEVICE = torch.device("meta")  # stands for the GPU: holds no values and runs no kernels itself
_READBACKS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
              torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class _OnDevice(torch.Tensor):
    """A tensor standing for one on the GPU; its values live in the CPU tensor ``host``."""

    @staticmethod
    def __new__(cls, host: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, host.shape, strides=host.stride(),
                                                   storage_offset=host.storage_offset(),
                                                   dtype=host.dtype, device=_DEVICE)

    def __init__(self, host: torch.Tensor):
        self.host = host

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a stand-in device tensor outside SyncCounter")


class SyncCounter:
    """Counts, on any machine, the host-device synchronisations code would make on a GPU.

    On a CPU ``.item()`` costs nothing, so timing cannot show a sync; this counts them instead.
    ``on_device(tensor)`` gives a tensor that stands for a GPU one (device ``meta``, values in a
    CPU tensor); every op on such tensors runs on their CPU values and its results stand on the
    device too, as do tensors made with ``device=`` theirs. Counted in ``syncs``, where CUDA
    would make the host wait: a value read back (``.item()``, ``float()``, ``.tolist()``,
    ``.cpu()``, ``torch.equal``, ``nonzero``, boolean-mask indexing) and a blocking upload of a
    CPU tensor (``.to(device)`` without ``non_blocking``, ``torch.tensor(..., device=)``, CPU
    index tensors). Uploads with ``non_blocking=True`` go to ``uploads``. Ops mixing stand-in
    and non-scalar CPU tensors raise, as they would on CUDA.
    """

    def __init__(self):
        self.syncs: list[str] = []
        self.uploads: list[str] = []
        self._modes = (_TensorLiterals(self), _DeviceOps(self))

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @staticmethod
    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        return _OnDevice(tensor)

    @staticmethod
    def on_host(tensor: torch.Tensor) -> torch.Tensor:
        """The values of a stand-in tensor (not counted: for checking results afterwards)."""
        return tensor.host if isinstance(tensor, _OnDevice) else tensor

    def _record(self, kind: str, what: str) -> None:
        getattr(self, kind).append(f"{what} at {_caller()}")


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module, to name the culprit."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


class _TensorLiterals(TorchFunctionMode):
    """What never reaches the dispatcher: ``torch.tensor(data, device=...)``, on CUDA a blocking
    upload of a CPU tensor, and ``.tolist()``, a read back."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device) == _DEVICE:
            self.counter._record("syncs", f"{func.__name__}(..., device=)")
            return _OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.tolist and isinstance(args[0], _OnDevice):
            self.counter._record("syncs", "tolist")
            return args[0].host.tolist()
        return func(*args, **kwargs)


class _DeviceOps(TorchDispatchMode):
    """Runs ops on stand-in tensors on their CPU values and records the host-device traffic."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if not any(isinstance(leaf, _OnDevice) for leaf in leaves) and kwargs.get("device") != _DEVICE:
            return func(*args, **kwargs)
        traffic = _traffic(func, args, kwargs, leaves)
        if traffic:
            self.counter._record(*traffic)
        out = func(*tree_map(_to_host, args), **tree_map(_to_host, kwargs))
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            return out
        # Ops that write into an argument return it: hand back the tensor that was passed.
        passed = {id(_to_host(leaf)): leaf for leaf in leaves if isinstance(leaf, torch.Tensor)}

        def on_device(value):
            if not isinstance(value, torch.Tensor):
                return value
            return passed[id(value)] if id(value) in passed else _OnDevice(value)
        return tree_map(on_device, out)


def _traffic(func, args, kwargs, leaves) -> tuple[str, str] | None:
    """``("syncs" or "uploads", what)`` for an op touching the stand-in device, if it moves
    values between host and device; raises where CUDA would refuse to mix devices."""
    name = func.__name__
    if func in _READBACKS:
        return "syncs", name
    if func is torch.ops.aten._to_copy.default:
        return _copy(name, args[0], kwargs.get("device"), kwargs.get("non_blocking", False))
    if func is torch.ops.aten.copy_.default:
        target = _DEVICE if isinstance(args[0], _OnDevice) else torch.device("cpu")
        return _copy(name, args[1], target, len(args) > 2 and args[2])
    host_tensors = [leaf for leaf in leaves if type(leaf) is torch.Tensor and leaf.dim() > 0]
    if func in _INDEXING:
        indices = [index for index in args[1] if index is not None]
        if any(index.dtype in (torch.bool, torch.uint8) for index in indices):
            return "syncs", f"{name} with a boolean mask"
        return ("syncs", f"{name} with CPU indices (uploaded)") if host_tensors else None
    if host_tensors:
        raise RuntimeError(f"{func} mixes device and CPU tensors of shapes {[tuple(t.shape) for t in host_tensors]}")
    return None


def _copy(name: str, source, target: torch.device | None, non_blocking: bool) -> tuple[str, str] | None:
    """A copy of ``source`` to the ``target`` device (None: where it is), as ``_traffic`` says."""
    on_device = isinstance(source, _OnDevice)
    if on_device and target == torch.device("cpu"):
        return "syncs", f"{name} to the CPU"
    if not on_device and target == _DEVICE:
        return ("uploads" if non_blocking else "syncs"), f"{name} to the device"
    return None


def _to_host(value):
    if isinstance(value, _OnDevice):
        return value.host
    if isinstance(value, torch.device) and value == _DEVICE:
        return torch.device("cpu")
    return value
