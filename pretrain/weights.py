"""Reading a pretrained ResNet: a checkpoint of our trainer (a dict whose ``"model"`` entry is
the ResNet state dict) or a plain torchvision state dict, either possibly wrapped by DDP
(``module.``) and/or ``torch.compile`` (``_orig_mod.``), checked tensor by tensor against
torchvision's ResNet of its depth.

The exporter (``pretrain.export``), the pretraining engine (``--resume`` from weights), the FGSM
tool and the torchvision detection engine all read weights through here, so a wrong file fails
the same way, naming the file, key or value at fault, wherever it is read.
"""
from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
import yaml

WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Bottleneck blocks per stage (layer1..layer4) for each supported depth.
BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
TORCHVISION_BUILDERS = {
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
MAX_NAMES_IN_ERROR = 10


class WeightsError(ValueError):
    """Weights that cannot be read, checked or exported as asked; the message names the file,
    key or value at fault."""


@dataclass
class ResNetSource:
    """A loaded ResNet state dict and what is known of where it came from."""

    path: Path
    kind: str                       # "checkpoint" (our trainer's dict) or "state dict"
    state: dict[str, torch.Tensor]  # wrapper prefixes already stripped
    epoch: int | None = None
    iteration: int | None = None
    arch: str | None = None         # MODEL.ARCH of the checkpoint's config, if recorded


def load_resnet_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> ResNetSource:
    """Read a checkpoint of ours or a plain state dict, without wrapper prefixes.

    Loads with ``weights_only=True`` (which cannot run code from the file); ``trust_pickle``
    allows full unpickling, for a file of your own that holds other Python objects."""
    path = Path(path)
    loaded = _torch_load(path, trust_pickle)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        source = ResNetSource(path, "checkpoint", _tensors_only(loaded["model"], path),
                              epoch=_int_or_none(loaded.get("epoch")),
                              iteration=_int_or_none(loaded.get("iteration")),
                              arch=_config_arch(loaded.get("cfg")))
    elif isinstance(loaded, Mapping) and loaded:
        source = ResNetSource(path, "state dict", _tensors_only(loaded, path))
    else:
        raise WeightsError(f"{path}: holds {type(loaded).__name__}, not a checkpoint with a "
                          "'model' entry nor a state dict")
    try:
        source.state = strip_wrapper_prefixes(source.state)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return source


def _torch_load(path: Path, trust_pickle: bool) -> object:
    """``torch.load`` on the CPU, turning every failure into an error naming the file."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        if reason.startswith("Unsupported global"):
            raise WeightsError(f"{path}: holds objects other than tensors, numbers, strings and "
                              f"containers ({reason}); if you trust this file, rerun with "
                              "--trust-pickle") from exc
        raise WeightsError(f"{path}: not a loadable PyTorch checkpoint ({reason})") from exc
    except Exception as exc:  # torch.load raises KeyError, RuntimeError, EOFError, ... on junk
        raise WeightsError(f"{path}: not a loadable PyTorch checkpoint "
                          f"({type(exc).__name__}: {exc})") from exc


def _weights_only_reason(exc: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights-only refusal that says what it refused."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
    return found[1].split(". ")[0] if found else str(exc).splitlines()[0]


def _tensors_only(state: Mapping, path: Path) -> dict[str, torch.Tensor]:
    """The state dict as a plain dict, refusing entries that are not tensors."""
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                              "tensor; not a state dict")
    return dict(state)


def _int_or_none(value: object) -> int | None:
    """Epoch/iteration for the summary, whether stored as an int or a 0-d tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    return value if isinstance(value, int) else None


def _config_arch(cfg: object) -> str | None:
    """MODEL.ARCH of a checkpoint's YAML config string, for the summary only."""
    if not isinstance(cfg, str):
        return None
    try:
        model = (yaml.safe_load(cfg) or {}).get("MODEL") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    return model.get("ARCH") if isinstance(model, Mapping) else None


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop any run of ``module.`` / ``_orig_mod.`` prefixes, which DDP and ``torch.compile``
    add (nested in either order) but which are not part of the ResNet's own names."""
    stripped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in state.items():
        bare = name
        while bare.startswith(WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        if bare in stripped:
            raise WeightsError(f"tensors {origin[bare]!r} and {name!r} are both {bare!r} "
                              "once the wrapper prefixes are removed")
        stripped[bare] = tensor
        origin[bare] = name
    return stripped


def resnet_depth(state: Mapping[str, torch.Tensor]) -> int:
    """The depth (50, 101 or 152) whose bottleneck-block counts per stage the keys show."""
    blocks = tuple(
        len({name.split(".")[1] for name in state if name.startswith(f"layer{stage}.")})
        for stage in range(1, 5)
    )
    if not any(blocks):
        shown = ", ".join(list(state)[:5]) or "none"
        raise WeightsError(f"no ResNet weights: no 'layer1.*' .. 'layer4.*' tensors "
                          f"(first keys: {shown})")
    if not any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", name) for name in state):
        raise WeightsError(f"basic-block ResNet found (blocks per stage {blocks}, no conv3): "
                          "only bottleneck ResNet-50/101/152 are supported")
    for depth, expected in BLOCKS_PER_DEPTH.items():
        if blocks == expected:
            return depth
    known = ", ".join(f"{depth}: {counts}" for depth, counts in BLOCKS_PER_DEPTH.items())
    raise WeightsError(f"unknown ResNet layout: blocks per stage {blocks}; known ({known})")


def is_backbone_tensor(name: str) -> bool:
    """A backbone tensor (what Detectron2 gets): not the classifier, not BN's batch counter."""
    return not name.startswith("fc.") and not name.endswith("num_batches_tracked")


@functools.lru_cache(maxsize=None)
def torchvision_shapes(depth: int) -> dict[str, torch.Size]:
    """Names and shapes of torchvision's ResNet of that depth, built on the meta device: no
    download, no memory, no time spent on initialisation."""
    with torch.device("meta"):
        model = TORCHVISION_BUILDERS[depth]()
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_backbone(state: Mapping[str, torch.Tensor], depth: int) -> None:
    """Refuse, naming the tensors, a backbone with a tensor missing, misshapen or unexpected
    against torchvision's ResNet of that depth: Detectron2 would silently skip them."""
    expected = {name: shape for name, shape in torchvision_shapes(depth).items()
                if is_backbone_tensor(name)}
    found = {name: tensor.shape for name, tensor in state.items() if is_backbone_tensor(name)}
    problems = [f"missing {name} {tuple(shape)}" for name, shape in expected.items()
                if name not in found]
    problems += [f"wrong shape {name}: {tuple(found[name])}, expected {tuple(shape)}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    problems += [f"unexpected {name} {tuple(shape)}" for name, shape in found.items()
                 if name not in expected]
    if problems:
        shown = "; ".join(problems[:MAX_NAMES_IN_ERROR])
        more = len(problems) - MAX_NAMES_IN_ERROR
        raise WeightsError(f"not a torchvision ResNet-{depth} backbone: {shown}"
                          + (f"; and {more} more" if more > 0 else ""))
