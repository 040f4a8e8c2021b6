"""Hand a pretrained torchvision ResNet to Detectron2 (or write it back as a torchvision state dict).

Detectron2 names a ResNet's tensors its own way and reads ImageNet backbones from a pickle of
numpy arrays. It skips any name it cannot place with only a log line, so a wrong export fails
silently at detection time; every backbone tensor is therefore checked (``helpers.weights``)
before anything is written, and files are written atomically.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from helpers.weights import (ResNetSource, WeightsError, check_backbone, is_backbone_tensor,
                             load_resnet_state_dict, resnet_depth, torchvision_shapes)
from pretrain.atomic_file import atomic_write

# torchvision -> Detectron2 names, applied in order, each at most once: conv1 / bn1 are the stem
# (stem.conv1 and its norm), layerN is res(N+1), bnK is convK's norm, downsample.0 / .1 are the
# shortcut's conv and its norm. E.g. layer1.0.downsample.1.weight -> res2.0.shortcut.norm.weight.
TORCHVISION_TO_DETECTRON2 = (
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.", lambda m: f"res{int(m[1]) + 1}."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
)
DETECTRON2_TO_TORCHVISION = (
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.", "conv1."),
    (r"^res(\d)\.", lambda m: f"layer{int(m[1]) - 1}."),
    (r"\.conv(\d)\.norm\.", r".bn\1."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.", ".downsample.0."),
)

FORMATS = ("detectron2", "torchvision")


def _rename(name: str, rules: tuple) -> str:
    """Apply each substitution rule once, in order."""
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def detectron2_name(torchvision_name: str) -> str:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight`` and so on."""
    return _rename(torchvision_name, TORCHVISION_TO_DETECTRON2)


def torchvision_name(detectron2_name: str) -> str:
    """The inverse of :func:`detectron2_name`."""
    return _rename(detectron2_name, DETECTRON2_TO_TORCHVISION)


def torchvision_to_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The backbone tensors under Detectron2's names, as float32 numpy arrays (the dtype of
    Detectron2's own ImageNet pickles; numpy has no bfloat16)."""
    return {detectron2_name(name): tensor.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, tensor in state.items() if is_backbone_tensor(name)}


def detectron2_to_torchvision(model: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map an exported backbone back to torchvision names (to prove the export loses nothing)."""
    return {torchvision_name(name): torch.from_numpy(np.asarray(array))
            for name, array in model.items()}


def torchvision_export_state(state: Mapping[str, torch.Tensor], depth: int
                             ) -> dict[str, torch.Tensor]:
    """The state dict torchvision's ResNet loads with ``strict=True``: the checked backbone,
    the classifier (required) and BN's batch counters where the source has them."""
    shapes = torchvision_shapes(depth)
    for name in ("fc.weight", "fc.bias"):
        if name not in state:
            raise WeightsError(f"missing {name}: the torchvision format keeps the classifier")
    features = shapes["fc.weight"][1]
    classes = state["fc.weight"].shape[0]
    for name, shape in (("fc.weight", (classes, features)), ("fc.bias", (classes,))):
        if tuple(state[name].shape) != shape:
            raise WeightsError(f"wrong shape {name}: {tuple(state[name].shape)}, "
                              f"expected {shape}")
    return {name: state[name] for name in shapes if name in state}


def write_detectron2_pickle(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                            author: str = "saliencymix-transfer") -> int:
    """Write Detectron2's ImageNet-backbone pickle; ``matching_heuristics`` lets Detectron2
    place ``res5`` under ``roi_heads`` in C4 models. Returns the tensor count."""
    model = torchvision_to_detectron2(state)
    payload = {"model": model, "__author__": author, "matching_heuristics": True}
    atomic_write(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    return len(model)


def write_torchvision(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> int:
    """Write a plain torchvision state dict (``torch.save``). Returns the tensor count."""
    atomic_write(path, lambda f: torch.save(dict(state), f))
    return len(state)


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike,
            fmt: str = "detectron2", trust_pickle: bool = False) -> str:
    """Check and export one checkpoint; returns the summary to print."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    input_path, output_path = Path(input_path), Path(output_path)
    if fmt == "detectron2" and output_path.suffix != ".pkl":
        raise WeightsError(f"{output_path}: Detectron2 reads its pickle format only from a "
                          "file named *.pkl")
    if output_path.exists() and input_path.exists() and output_path.samefile(input_path):
        raise WeightsError(f"{output_path}: the output would overwrite the input")
    source = load_resnet_state_dict(input_path, trust_pickle)
    try:
        depth = resnet_depth(source.state)
        check_backbone(source.state, depth)
        state = (source.state if fmt == "detectron2"
                 else torchvision_export_state(source.state, depth))
    except WeightsError as exc:
        raise WeightsError(f"{input_path}: {exc}") from None
    if fmt == "detectron2":
        count = write_detectron2_pickle(output_path, state,
                                        author=f"saliencymix-transfer from {input_path.name}")
        written = "Detectron2 pickle (matching_heuristics=True)"
    else:
        count = write_torchvision(output_path, state)
        classes = state["fc.weight"].shape[0]
        written = f"torchvision state dict for torchvision.models.resnet{depth}({classes} classes)"
    return _summary(source, depth, count, output_path, written)


def _summary(source: ResNetSource, depth: int, count: int, output: Path, written: str) -> str:
    """A few lines saying what was read (the form found, and what the file records of itself)
    and what was written."""
    return (f"read   ResNet-{depth} from {source.describe()}\n"
            f"wrote  {count} tensors to {output}\n"
            f"format {written}")
