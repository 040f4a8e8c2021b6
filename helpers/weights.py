"""Reading a pretrained ResNet from any common form of released ImageNet weights, checked tensor
by tensor against torchvision's ResNet of its depth.

The forms (``FORMS``) are those in which the mixing papers, torchvision, timm and mmpretrain
publish ResNets; each holds torchvision's names once its wrapper prefixes are gone (DataParallel,
DDP and ``torch.compile`` add ``module.`` / ``_orig_mod.``; mmpretrain keeps the network under
``backbone.`` and the classifier under ``head.fc.``). Files are read with ``weights_only=True``,
which cannot run code from the file, legacy (pre-zip) files included.

The exporter, the pretraining tool's ``--eval-only``, the FGSM tool and the torchvision detection
engine all read weights through here, so a wrong file fails the same way, naming the file, key
or value at fault, wherever it is read.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
import yaml
from torch import nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# mmpretrain / OpenMixup names -> torchvision's: the network, and the linear classifier head.
MMPRETRAIN_PREFIXES = (("backbone.", ""), ("head.fc.", "fc."))

# The forms read, as the summary and the error for an unknown file name them.
OURS = "checkpoint of tools/pretrain_net.py ('model')"
OFFICIAL = "SaliencyMix / CutMix / PuzzleMix train.py checkpoint ('state_dict', 'best_err1')"
COMIXUP = "Co-Mixup checkpoint ('state_dict', 'best_prec1')"
MMPRETRAIN = "mmpretrain / OpenMixup checkpoint ('state_dict' with 'backbone.' and 'head.fc.' names)"
STATE_DICT_ENTRY = "checkpoint with a 'state_dict' entry"
STATE_DICT = "state dict (torchvision resnet50-*.pth, timm pytorch_model.bin)"
SAFETENSORS = "safetensors file (timm model.safetensors)"
FORMS = (OURS, OFFICIAL, COMIXUP, MMPRETRAIN, STATE_DICT_ENTRY, STATE_DICT, SAFETENSORS)
# Scalars a checkpoint may record beside its weights, shown in the summary (the file's own word
# on what it is, e.g. the official checkpoints' best top-1 error).
FACT_KEYS = ("epoch", "iteration", "arch", "best_err1", "best_err5", "best_prec1")

# Bottleneck blocks per stage (layer1..layer4) for each supported depth.
BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
TORCHVISION_BUILDERS = {
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
MAX_NAMES_IN_ERROR = 10
HASH_CHUNK = 1 << 20


class WeightsError(ValueError):
    """Weights that cannot be read, checked or exported as asked; the message names the file,
    key or value at fault."""


@dataclass
class ResNetSource:
    """A loaded ResNet state dict (torchvision's names) and what is known of where it came from."""

    path: Path
    form: str                       # one of FORMS
    state: dict[str, torch.Tensor]
    facts: dict[str, object] = field(default_factory=dict)  # e.g. {"epoch": 300, "best_err1": 21.26}

    def describe(self) -> str:
        shown = ", ".join(f"{name} {value}" for name, value in self.facts.items())
        return f"{self.form} {self.path}" + (f" ({shown})" if shown else "")


def load_resnet_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> ResNetSource:
    """Read a ResNet in any of ``FORMS``, under torchvision's names.

    ``trust_pickle`` allows full unpickling, for a file of your own that holds other Python
    objects than tensors, numbers, strings and containers."""
    path = Path(path)
    if _is_safetensors(path):
        source = ResNetSource(path, SAFETENSORS, _tensors_only(_load_safetensors(path), path))
    else:
        source = _identify(_torch_load(path, trust_pickle), path)
    try:
        source.state = strip_wrapper_prefixes(source.state)
        if source.form == MMPRETRAIN:
            source.state = _rename_prefixes(source.state, MMPRETRAIN_PREFIXES)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return source


def _identify(loaded: object, path: Path) -> ResNetSource:
    """Which of ``FORMS`` a loaded object is, and its state dict; one line naming the file and
    the forms accepted when it is none of them."""
    if isinstance(loaded, Mapping):
        if isinstance(loaded.get("model"), Mapping):
            facts = _facts(loaded)
            arch = _config_arch(loaded.get("cfg"))
            if arch:
                facts["MODEL.ARCH"] = arch
            return ResNetSource(path, OURS, _tensors_only(loaded["model"], path), facts)
        if isinstance(loaded.get("state_dict"), Mapping):
            state = _tensors_only(loaded["state_dict"], path)
            meta = loaded.get("meta") if isinstance(loaded.get("meta"), Mapping) else {}
            if "best_err1" in loaded:
                form = OFFICIAL
            elif "best_prec1" in loaded:
                form = COMIXUP
            elif any(name.startswith("backbone.") for name in state):
                form = MMPRETRAIN
            else:
                form = STATE_DICT_ENTRY
            return ResNetSource(path, form, state, {**_facts(meta), **_facts(loaded)})
        if any(isinstance(value, torch.Tensor) for value in loaded.values()):
            return ResNetSource(path, STATE_DICT, _tensors_only(loaded, path))
    found = (f"a dict with the entries {sorted(map(str, loaded))[:MAX_NAMES_IN_ERROR]}"
             if isinstance(loaded, Mapping) else f"a {type(loaded).__name__}")
    raise WeightsError(f"{path}: holds {found}, none of the forms of ResNet weights read here: "
                       + "; ".join(FORMS))


def _facts(container: Mapping) -> dict[str, object]:
    """The recorded scalars of ``FACT_KEYS``, whether stored as numbers, strings or 0-d tensors."""
    facts = {}
    for key in FACT_KEYS:
        value = container.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            facts[key] = round(value, 4) if isinstance(value, float) else value
    return facts


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then
    ``{``; a PyTorch file starts with a zip (``PK``) or pickle (``0x80``) header."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


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


def _config_arch(cfg: object) -> str | None:
    """MODEL.ARCH of a checkpoint's YAML config string, for the summary only."""
    if not isinstance(cfg, str):
        return None
    try:
        model = (yaml.safe_load(cfg) or {}).get("MODEL") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    return model.get("ARCH") if isinstance(model, Mapping) else None


def _renamed(state: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """``state`` under new names, refusing two tensors that would get the same one."""
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in state.items():
        new = rename(name)
        if new in renamed:
            raise WeightsError(f"tensors {origin[new]!r} and {name!r} are both {new!r} once renamed")
        renamed[new] = tensor
        origin[new] = name
    return renamed


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop any run of ``module.`` / ``_orig_mod.`` prefixes, which DataParallel, DDP and
    ``torch.compile`` add (nested in either order) but which are not part of the ResNet's names."""
    def bare(name: str) -> str:
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        return name
    return _renamed(state, bare)


def _rename_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[tuple[str, str], ...]
                     ) -> dict[str, torch.Tensor]:
    """Replace the first matching prefix of each name; other names stay (and a check names them)."""
    def rename(name: str) -> str:
        for old, new in prefixes:
            if name.startswith(old):
                return new + name[len(old):]
        return name
    return _renamed(state, rename)


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


def is_batch_counter(name: str) -> bool:
    """BN's ``num_batches_tracked``: files saved before torch 0.4.1, and frozen BN, have none."""
    return name.endswith("num_batches_tracked")


def is_backbone_tensor(name: str) -> bool:
    """A backbone tensor (what Detectron2 gets): not the classifier, not BN's batch counter."""
    return not name.startswith("fc.") and not is_batch_counter(name)


@functools.lru_cache(maxsize=None)
def torchvision_shapes(depth: int) -> dict[str, torch.Size]:
    """Names and shapes of torchvision's ResNet of that depth, built on the meta device: no
    download, no memory, no time spent on initialisation."""
    with torch.device("meta"):
        model = TORCHVISION_BUILDERS[depth]()
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def shape_problems(found: Mapping[str, torch.Size], expected: Mapping[str, torch.Size]) -> str:
    """Each tensor missing, misshapen or unexpected (BN batch counters may be missing: torch
    fills them in), in one line; empty when ``found`` fits ``expected``."""
    problems = [f"missing {name} {tuple(shape)}" for name, shape in expected.items()
                if name not in found and not is_batch_counter(name)]
    problems += [f"wrong shape {name}: {tuple(found[name])}, expected {tuple(shape)}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    problems += [f"unexpected {name} {tuple(shape)}" for name, shape in found.items()
                 if name not in expected]
    shown = "; ".join(problems[:MAX_NAMES_IN_ERROR])
    more = len(problems) - MAX_NAMES_IN_ERROR
    return shown + (f"; and {more} more" if more > 0 else "")


def check_backbone(state: Mapping[str, torch.Tensor], depth: int) -> None:
    """Refuse, naming the tensors, a backbone with a tensor missing, misshapen or unexpected
    against torchvision's ResNet of that depth: Detectron2 would silently skip them."""
    problems = shape_problems(
        {name: tensor.shape for name, tensor in state.items() if is_backbone_tensor(name)},
        {name: shape for name, shape in torchvision_shapes(depth).items() if is_backbone_tensor(name)})
    if problems:
        raise WeightsError(f"not a torchvision ResNet-{depth} backbone: {problems}")


def read_classifier_state(path: str | os.PathLike, model: nn.Module, model_name: str) -> ResNetSource:
    """A weights file's state, checked to fit ``model`` (``model_name`` says which, e.g.
    ``MODEL.ARCH resnet50 with 1000 classes``) tensor by tensor: a file of another depth or class
    count is one error naming the file. ``model`` may live on the meta device (a check only)."""
    source = load_resnet_state_dict(path)
    problems = shape_problems({name: tensor.shape for name, tensor in source.state.items()},
                              {name: tensor.shape for name, tensor in model.state_dict().items()})
    if problems:
        raise WeightsError(f"{source.path}: does not fit {model_name}: {problems}")
    return source


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), so that a result says which weights file it came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
