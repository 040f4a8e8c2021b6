"""Hand a pretrained torchvision ResNet to Detectron2.

Detectron2 names a ResNet's tensors its own way and reads ImageNet backbones from a pickle of
numpy arrays. It skips any name it cannot place with only a log line, so a wrong export fails
silently at detection time; this module therefore checks every backbone tensor against the
torchvision ResNet of the detected depth before writing anything, and writes atomically.

The input is a checkpoint of our trainer (a dict whose ``"model"`` entry is the ResNet state
dict) or a plain torchvision state dict, either possibly wrapped by DDP (``module.``) and/or
``torch.compile`` (``_orig_mod.``).
"""
from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml

from pretrain.atomic_file import atomic_write

WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Bottleneck blocks per stage (layer1..layer4) for each supported depth.
BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
TORCHVISION_BUILDERS = {
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}

# torchvision -> Detectron2 names (REFERENCE.md), applied in order, each at most once.
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
MAX_NAMES_IN_ERROR = 10


class ExportError(ValueError):
    """An input that cannot be exported; the message names the file, key or value at fault."""


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
        raise ExportError(f"{path}: holds {type(loaded).__name__}, not a checkpoint with a "
                          "'model' entry nor a state dict")
    try:
        source.state = strip_wrapper_prefixes(source.state)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
    return source


def _torch_load(path: Path, trust_pickle: bool) -> object:
    """``torch.load`` on the CPU, turning every failure into an error naming the file."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        if reason.startswith("Unsupported global"):
            raise ExportError(f"{path}: holds objects other than tensors, numbers, strings and "
                              f"containers ({reason}); if you trust this file, rerun with "
                              "--trust-pickle") from exc
        raise ExportError(f"{path}: not a loadable PyTorch checkpoint ({reason})") from exc
    except Exception as exc:  # torch.load raises KeyError, RuntimeError, EOFError, ... on junk
        raise ExportError(f"{path}: not a loadable PyTorch checkpoint "
                          f"({type(exc).__name__}: {exc})") from exc


def _weights_only_reason(exc: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights-only refusal that says what it refused."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
    return found[1].split(". ")[0] if found else str(exc).splitlines()[0]


def _tensors_only(state: Mapping, path: Path) -> dict[str, torch.Tensor]:
    """The state dict as a plain dict, refusing entries that are not tensors."""
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
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
            raise ExportError(f"tensors {origin[bare]!r} and {name!r} are both {bare!r} "
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
        raise ExportError(f"no ResNet weights: no 'layer1.*' .. 'layer4.*' tensors "
                          f"(first keys: {shown})")
    if not any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", name) for name in state):
        raise ExportError(f"basic-block ResNet found (blocks per stage {blocks}, no conv3): "
                          "only bottleneck ResNet-50/101/152 are supported")
    for depth, expected in BLOCKS_PER_DEPTH.items():
        if blocks == expected:
            return depth
    known = ", ".join(f"{depth}: {counts}" for depth, counts in BLOCKS_PER_DEPTH.items())
    raise ExportError(f"unknown ResNet layout: blocks per stage {blocks}; known ({known})")


def is_backbone_tensor(name: str) -> bool:
    """Whether Detectron2 gets this tensor: not the classifier, not BN's batch counter."""
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
        raise ExportError(f"not a torchvision ResNet-{depth} backbone: {shown}"
                          + (f"; and {more} more" if more > 0 else ""))


def _rename(name: str, rules: tuple) -> str:
    """Apply each substitution rule once, in order."""
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def detectron2_name(torchvision_name: str) -> str:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight`` and so on (REFERENCE.md)."""
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
            raise ExportError(f"missing {name}: the torchvision format keeps the classifier")
    features = shapes["fc.weight"][1]
    classes = state["fc.weight"].shape[0]
    for name, shape in (("fc.weight", (classes, features)), ("fc.bias", (classes,))):
        if tuple(state[name].shape) != shape:
            raise ExportError(f"wrong shape {name}: {tuple(state[name].shape)}, "
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
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    input_path, output_path = Path(input_path), Path(output_path)
    if fmt == "detectron2" and output_path.suffix != ".pkl":
        raise ExportError(f"{output_path}: Detectron2 reads its pickle format only from a "
                          "file named *.pkl")
    if output_path.exists() and input_path.exists() and output_path.samefile(input_path):
        raise ExportError(f"{output_path}: the output would overwrite the input")
    source = load_resnet_state_dict(input_path, trust_pickle)
    try:
        depth = resnet_depth(source.state)
        check_backbone(source.state, depth)
        state = (source.state if fmt == "detectron2"
                 else torchvision_export_state(source.state, depth))
    except ExportError as exc:
        raise ExportError(f"{input_path}: {exc}") from None
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
    """A few lines saying what was read and what was written."""
    facts = [f"{name} {value}" for name, value in (("epoch", source.epoch),
                                                  ("iteration", source.iteration),
                                                  ("MODEL.ARCH", source.arch))
             if value is not None]
    origin = f"{source.kind} {source.path}" + (f" ({', '.join(facts)})" if facts else "")
    return (f"read   ResNet-{depth} from {origin}\n"
            f"wrote  {count} tensors to {output}\n"
            f"format {written}")
