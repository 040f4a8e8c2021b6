"""Tests of ``helpers.weights``, ``pretrain.export`` and ``tools/convert_to_d2.py``: reading a
ResNet in every form it is released in, and the torchvision -> Detectron2 ResNet export.

The sources are real torchvision ResNets (random init, nothing downloaded) whose BN running
statistics are randomised too, so no exported tensor equals a freshly initialised one: a tensor
equal to its source after loading has really been loaded. The Detectron2 tests at the end are
skipped when Detectron2 is not installed.
"""
from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from helpers import weights
from helpers.weights import (
    WeightsError,
    is_backbone_tensor,
    load_resnet_state_dict,
    resnet_depth,
    strip_wrapper_prefixes,
)
from pretrain.atomic_file import atomic_write
from pretrain.export import convert, detectron2_to_torchvision
from tool_process import run_tool

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_to_d2.py"

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
TENSOR_COUNTS = {50: 265, 101: 520}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

TORCHVISION_PIXEL_MEAN = [123.675, 116.280, 103.530]
TORCHVISION_PIXEL_STD = [58.395, 57.120, 57.375]


def random_resnet_state(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet's state dict with every tensor, BN statistics included, random."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_()
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
        elif name.endswith("num_batches_tracked"):
            tensor.fill_(1234)
    return state


def expected_detectron2_names(blocks: tuple[int, ...]) -> set[str]:
    """Detectron2's ResNet names, written out from its layout rather than from the mapping."""
    def conv(name: str) -> set[str]:
        return {f"{name}.weight"} | {f"{name}.norm.{t}" for t in BN_TENSORS}

    names = conv("stem.conv1")
    for stage, count in enumerate(blocks, start=2):
        names |= conv(f"res{stage}.0.shortcut")
        for block in range(count):
            for k in (1, 2, 3):
                names |= conv(f"res{stage}.{block}.conv{k}")
    return names


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state.items() if is_backbone_tensor(name)}


def read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[int, tuple[dict[str, torch.Tensor], Path]]:
    """depth -> (state dict, the file it is saved in as a plain torchvision state dict)."""
    folder = tmp_path_factory.mktemp("sources")
    result = {}
    for depth in BLOCKS:
        state = random_resnet_state(depth, seed=depth)
        path = folder / f"resnet{depth}.pth"
        torch.save(state, path)
        result[depth] = (state, path)
    return result


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory) -> dict[int, Path]:
    """depth -> the Detectron2 pickle exported from that source."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {}
    for depth, (_, source) in sources.items():
        paths[depth] = folder / f"resnet{depth}.pkl"
        convert(source, paths[depth])
    return paths


@pytest.fixture
def r50(sources) -> dict[str, torch.Tensor]:
    """A fresh copy of the ResNet-50 source's dict (tests modify it)."""
    return dict(sources[50][0])


# ----------------------------------------------------------------------------------- the format


@pytest.mark.parametrize("depth", [50, 101])
def test_export_has_detectron2_names_and_count(depth, exported):
    payload = read_pickle(exported[depth])
    assert set(payload) == {"model", "__author__", "matching_heuristics"}
    assert isinstance(payload["__author__"], str) and payload["matching_heuristics"] is True
    model = payload["model"]
    assert len(model) == TENSOR_COUNTS[depth]
    assert set(model) == expected_detectron2_names(BLOCKS[depth])
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in model.values())


def test_export_spot_checks(sources, exported):
    state, model = sources[50][0], read_pickle(exported[50])["model"]
    pairs = {
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.running_mean": "bn1.running_mean",
        "res2.0.conv1.weight": "layer1.0.conv1.weight",
        "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
        "res3.0.shortcut.norm.bias": "layer2.0.downsample.1.bias",
        "res4.5.conv2.weight": "layer3.5.conv2.weight",
        "res5.2.conv3.norm.running_var": "layer4.2.bn3.running_var",
        "res5.0.conv2.norm.weight": "layer4.0.bn2.weight",
    }
    for d2_name, tv_name in pairs.items():
        np.testing.assert_array_equal(model[d2_name], state[tv_name].numpy(), err_msg=d2_name)
    assert model["res4.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert not any(name.startswith("fc") or "num_batches_tracked" in name for name in model)


@pytest.mark.parametrize("depth", [50, 101])
def test_round_trip_gives_identical_tensors(depth, sources, exported):
    state = backbone(sources[depth][0])
    back = detectron2_to_torchvision(read_pickle(exported[depth])["model"])
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


# ----------------------------------------------------------------------------------- the inputs


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(prefix, r50):
    wrapped = {prefix + name: tensor for name, tensor in r50.items()}
    assert strip_wrapper_prefixes(wrapped) == r50


def test_prefixes_clashing_after_stripping_are_refused(r50):
    with pytest.raises(WeightsError, match=r"'conv1.weight' and 'module.conv1.weight'"):
        strip_wrapper_prefixes({"conv1.weight": r50["conv1.weight"],
                                "module.conv1.weight": r50["conv1.weight"]})


def test_prefixed_state_dict_file_exports(r50, tmp_path, exported):
    torch.save({f"module._orig_mod.{name}": t for name, t in r50.items()}, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "out.pkl")
    assert_same_pickle(tmp_path / "out.pkl", exported[50])


def test_our_checkpoint_format_exports(r50, tmp_path, exported):
    checkpoint = {
        "model": {f"_orig_mod.module.{name}": t for name, t in r50.items()},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"last_epoch": 7}, "scaler": {"scale": 1024.0},
        "epoch": 12, "iteration": 3400,
        "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
        "sampler": {"epoch": 12, "position": 64},
        "cfg": "MODEL:\n  ARCH: resnet50\nSOLVER:\n  BASE_LR: 0.1\n",
        "metrics": {"top1_error": 23.5},
    }
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    summary = convert(tmp_path / "ckpt.pth", tmp_path / "out.pkl")
    assert "265 tensors" in summary and "ResNet-50" in summary
    assert "epoch 12" in summary and "iteration 3400" in summary and "resnet50" in summary
    assert_same_pickle(tmp_path / "out.pkl", exported[50])
    assert load_resnet_state_dict(tmp_path / "ckpt.pth").form == weights.OURS


def assert_same_pickle(path: Path, reference: Path) -> None:
    model, expected = read_pickle(path)["model"], read_pickle(reference)["model"]
    assert set(model) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(model[name], expected[name], err_msg=name)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a loadable PyTorch checkpoint"),
    ([1, 2, 3], "holds a list, none of the forms of ResNet weights read here: checkpoint of "),
    ({"conv1.weight": torch.zeros(1), "bn1.weight": "text"}, "entry 'bn1.weight' is a str"),
    ({"weight": torch.zeros(1)}, "no ResNet weights"),
    ({"conv1.weight": torch.zeros(1), "step": np.float64(1.0)},
     "Unsupported global.*--trust-pickle"),
])
def test_unusable_inputs_are_refused_naming_the_file(content, message, tmp_path):
    source = tmp_path / "input.pth"
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        torch.save(content, source)
    with pytest.raises(WeightsError, match=message) as error:
        convert(source, tmp_path / "out.pkl")
    assert str(error.value).startswith(f"{source}: ")
    assert not (tmp_path / "out.pkl").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'absent.pth'}: no such file"):
        convert(tmp_path / "absent.pth", tmp_path / "out.pkl")


# ---------------------------------------------------------------- the forms ResNets are released in


def trained_one_step(state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.optim.SGD]:
    """A ResNet-50 holding ``state``, after one SGD step with momentum, as at the end of training:
    its optimizer holds momentum buffers, and its weights and BN statistics have moved."""
    model = torchvision.models.resnet50()
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(0)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2])).backward()
    optimizer.step()
    return model, optimizer


def save_official(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """As the SaliencyMix / CutMix / PuzzleMix train.py saves model_best.pth.tar: the model in
    DataParallel, the legacy (pre-zip) format of the torch versions they used."""
    model, optimizer = trained_one_step(state)
    wrapped = torch.nn.DataParallel(model)
    torch.save({"epoch": 300, "arch": "resnet", "state_dict": wrapped.state_dict(), "best_err1": 21.26,
                "best_err5": torch.tensor(5.76), "optimizer": optimizer.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    return model.state_dict()


def save_comixup(state: dict, path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """As Co-Mixup saves its checkpoint: the model in DistributedDataParallel, ``best_prec1``."""
    import torch.distributed as dist

    model, optimizer = trained_one_step(state)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        torch.save({"epoch": 300, "arch": "resnet50", "state_dict": wrapped.state_dict(),
                    "best_prec1": torch.tensor(77.6), "optimizer": optimizer.state_dict()}, path)
    finally:
        dist.destroy_process_group()
    return model.state_dict()


def save_mmpretrain(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """As mmpretrain / OpenMixup publish a checkpoint: ``meta`` and the ``ImageClassifier``'s state
    dict, the ResNet under ``backbone.`` and its linear head under ``head.fc.``."""
    renamed = {(f"head.{name}" if name.startswith("fc.") else f"backbone.{name}"): tensor
               for name, tensor in state.items()}
    meta = {"epoch": 100, "iter": 500400, "mmengine_version": "0.7.3",
            "dataset_meta": {"classes": ("tench", "goldfish")}}
    torch.save({"meta": meta, "state_dict": renamed}, path)
    return state


def without_batch_counters(state: dict) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state.items() if not name.endswith("num_batches_tracked")}


def save_torchvision_legacy(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """As torchvision's resnet50-0676ba61.pth: a plain state dict, from a torch version whose BN
    had no batch counter, in the legacy format."""
    torch.save(without_batch_counters(state), path, _use_new_zipfile_serialization=False)
    return state


def save_plain(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """As torchvision's resnet50-11ad3fa6.pth and timm's pytorch_model.bin: ``torch.save(state_dict)``."""
    torch.save(state, path)
    return state


def save_safetensors(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """As timm's model.safetensors (no BN batch counters)."""
    from safetensors.torch import save_file

    save_file(without_batch_counters(state), path)
    return state


@pytest.fixture(scope="module")
def released(sources, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """form -> (the file, the ResNet-50 state it holds), each saved the way its project saves it."""
    folder = tmp_path_factory.mktemp("released")
    state = sources[50][0]
    return {
        weights.OFFICIAL: (folder / "model_best.pth.tar", save_official(state, folder / "model_best.pth.tar")),
        weights.COMIXUP: (folder / "comixup.pth.tar", save_comixup(state, folder / "comixup.pth.tar", folder)),
        weights.MMPRETRAIN: (folder / "mmpretrain.pth", save_mmpretrain(state, folder / "mmpretrain.pth")),
        f"{weights.STATE_DICT} (legacy)": (folder / "resnet50-0676ba61.pth",
                                          save_torchvision_legacy(state, folder / "resnet50-0676ba61.pth")),
        weights.STATE_DICT: (folder / "pytorch_model.bin", save_plain(state, folder / "pytorch_model.bin")),
        weights.SAFETENSORS: (folder / "model.safetensors", save_safetensors(state, folder / "model.safetensors")),
    }


RELEASED_FORMS = [weights.OFFICIAL, weights.COMIXUP, weights.MMPRETRAIN, f"{weights.STATE_DICT} (legacy)",
                  weights.STATE_DICT, weights.SAFETENSORS]


@pytest.mark.parametrize("form", RELEASED_FORMS)
def test_every_released_form_exports_all_265_backbone_tensors_unchanged(form, released, tmp_path):
    path, state = released[form]
    summary = convert(path, tmp_path / "out.pkl")
    assert f"from {form.removesuffix(' (legacy)')} {path}" in summary and "265 tensors" in summary
    back = detectron2_to_torchvision(read_pickle(tmp_path / "out.pkl")["model"])
    assert set(back) == set(backbone(state)) and len(back) == 265
    for name, tensor in backbone(state).items():
        assert torch.equal(back[name], tensor), name
    # The classifier comes along too, for evaluation: the whole torchvision model loads strictly.
    model = torchvision.models.resnet50()
    model.load_state_dict(load_resnet_state_dict(path).state)
    for name, tensor in without_batch_counters(state).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_the_summary_says_what_an_official_checkpoint_records_of_itself(released, tmp_path):
    path, _ = released[weights.OFFICIAL]
    result = run_cli(path, tmp_path / "r50.pkl")
    assert result.returncode == 0, result.stderr
    assert (f"read   ResNet-50 from SaliencyMix / CutMix / PuzzleMix train.py checkpoint ('state_dict', "
            f"'best_err1') {path} (epoch 300, arch resnet, best_err1 21.26, best_err5 5.76)") in result.stdout


def test_released_form_errors_name_the_file_on_one_line_and_write_nothing(tmp_path):
    resnet18 = torch.nn.DataParallel(torchvision.models.resnet18()).state_dict()
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": resnet18, "best_err1": 30.2, "best_err5": 10.9,
                "optimizer": {}}, tmp_path / "resnet18.pth.tar")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:5_000_000])
    torch.save({"epoch": 300, "arch": "resnet", "best_err1": 21.26}, tmp_path / "no_weights.pth.tar")
    for name, message in (("resnet18.pth.tar", "basic-block ResNet found (blocks per stage (2, 2, 2, 2), no conv3)"),
                          ("truncated.pth", "not a loadable PyTorch checkpoint"),
                          ("no_weights.pth.tar", "holds a dict with the entries ['arch', 'best_err1', 'epoch'], "
                                                 "none of the forms of ResNet weights read here: "
                                                 + "; ".join(weights.FORMS))):
        with pytest.raises(WeightsError) as error:
            convert(tmp_path / name, tmp_path / "out.pkl")
        assert str(error.value).startswith(f"{tmp_path / name}: ") and message in str(error.value)
        assert "\n" not in str(error.value) and not (tmp_path / "out.pkl").exists()
    result = run_cli(tmp_path / "no_weights.pth.tar", tmp_path / "out.pkl")  # as the tool prints it
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path / 'no_weights.pth.tar'}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.pkl").exists()


def test_a_mmpretrain_checkpoint_with_more_than_a_resnet_names_the_extra_tensors(r50, tmp_path):
    """Nothing is dropped silently: a module beside backbone and head.fc (e.g. a momentum copy)
    is named, not skipped."""
    save_mmpretrain({**r50, "neck.momentum.weight": torch.zeros(4)}, tmp_path / "in.pth")
    with pytest.raises(WeightsError, match=r"unexpected neck\.momentum\.weight \(4,\)"):
        convert(tmp_path / "in.pth", tmp_path / "out.pkl")


def test_depth_is_read_from_the_block_counts(sources, r50):
    assert resnet_depth(r50) == 50 and resnet_depth(sources[101][0]) == 101
    without_block = {n: t for n, t in r50.items() if not n.startswith("layer3.5.")}
    with pytest.raises(WeightsError, match=r"unknown ResNet layout: blocks per stage "
                                          r"\(3, 4, 5, 3\)"):
        resnet_depth(without_block)
    with pytest.raises(WeightsError, match="basic-block ResNet"):
        resnet_depth(torchvision.models.resnet34().state_dict())


# ---------------------------------------------------------------------- refusals, atomic writes


def refused(state: dict, tmp_path: Path, match: str, output: str = "out.pkl") -> Path:
    """Export ``state`` and expect an error matching ``match``; returns the output path."""
    torch.save(state, tmp_path / "in.pth")
    with pytest.raises(WeightsError, match=match):
        convert(tmp_path / "in.pth", tmp_path / output)
    return tmp_path / output


def test_missing_tensor_is_named_and_nothing_written(r50, tmp_path):
    del r50["layer3.2.bn2.running_var"]
    out = refused(r50, tmp_path, r"missing layer3\.2\.bn2\.running_var \(256,\)")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in.pth"]


def test_misshapen_tensor_is_named_and_nothing_written(r50, tmp_path):
    r50["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    out = refused(r50, tmp_path, r"wrong shape layer2\.1\.conv2\.weight: \(128, 128, 1, 1\), "
                                 r"expected \(128, 128, 3, 3\)")
    assert not out.exists()


def test_unexpected_backbone_tensor_is_named(r50, tmp_path):
    r50["layer1.0.extra.weight"] = torch.zeros(3)
    refused(r50, tmp_path, r"unexpected layer1\.0\.extra\.weight")


def test_existing_output_is_not_clobbered_on_error(r50, tmp_path):
    (tmp_path / "out.pkl").write_bytes(b"previous export")
    del r50["conv1.weight"]
    refused(r50, tmp_path, "missing conv1.weight")
    assert (tmp_path / "out.pkl").read_bytes() == b"previous export"


def test_atomic_write_failing_midway_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.pkl"
    target.write_bytes(b"previous export")

    def write_then_fail(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_then_fail)
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"previous export"


def test_detectron2_output_must_be_a_pkl(sources, tmp_path):
    with pytest.raises(WeightsError, match=r"\*\.pkl"):
        convert(sources[50][1], tmp_path / "out.pth")


def test_output_may_not_overwrite_input(r50, tmp_path):
    torch.save(r50, tmp_path / "same.pkl")
    with pytest.raises(WeightsError, match="would overwrite the input"):
        convert(tmp_path / "same.pkl", tmp_path / "same.pkl")


# ---------------------------------------------------------------------- the torchvision format


def test_torchvision_format_loads_strictly(sources, tmp_path):
    state, source = sources[50]
    torch.save({f"module.{name}": t for name, t in state.items()}, tmp_path / "in.pth")
    summary = convert(tmp_path / "in.pth", tmp_path / "out.pth", fmt="torchvision")
    assert "torchvision" in summary
    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_torchvision_format_needs_the_classifier(r50, tmp_path):
    del r50["fc.weight"]
    torch.save(r50, tmp_path / "in.pth")
    with pytest.raises(WeightsError, match="missing fc.weight"):
        convert(tmp_path / "in.pth", tmp_path / "out.pth", fmt="torchvision")
    assert not (tmp_path / "out.pth").exists()
    convert(tmp_path / "in.pth", tmp_path / "out.pkl")  # Detectron2 needs no classifier

# ----------------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_tool(CLI, *args, timeout=120)


def test_cli_prints_summary(sources, tmp_path):
    result = run_cli(sources[50][1], tmp_path / "r50.pkl")
    assert result.returncode == 0, result.stderr
    assert "ResNet-50" in result.stdout and "265 tensors" in result.stdout
    assert str(sources[50][1]) in result.stdout
    assert len(read_pickle(tmp_path / "r50.pkl")["model"]) == 265


def test_cli_names_the_bad_tensor(r50, tmp_path):
    torch.save({name: torch.zeros(1) for name in r50}, tmp_path / "in.pth")  # small and wrong
    result = run_cli(tmp_path / "in.pth", tmp_path / "out.pkl")
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {tmp_path / 'in.pth'}: ")
    assert "wrong shape conv1.weight: (1,), expected (64, 3, 7, 7)" in result.stderr
    assert not (tmp_path / "out.pkl").exists()


# ------------------------------------------------------------------ Detectron2 (when installed)


def detectron2_model(config: str, depth: int = 50) -> torch.nn.Module:
    """A Detectron2 model from the model zoo, set up for torchvision weights, on the CPU."""
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    # The model zoo's configs ship inside the package; ``detectron2.model_zoo`` itself is not
    # imported because it needs ``pkg_resources``, which setuptools >= 81 no longer has.
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(detectron2.__file__).parent / "model_zoo" / "configs" / config))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", depth,
        "MODEL.RESNETS.STRIDE_IN_1X1", False, "INPUT.FORMAT", "RGB",
        "MODEL.PIXEL_MEAN", TORCHVISION_PIXEL_MEAN, "MODEL.PIXEL_STD", TORCHVISION_PIXEL_STD,
    ])
    return build_model(cfg)


def resnet_tensors_in(model_state: dict, fpn: bool) -> dict[str, str]:
    """Detectron2 ResNet name -> where the model holds it: ``backbone.bottom_up.*`` in FPN;
    ``backbone.*`` in C4, except ``res5`` which the C4 box head owns (``roi_heads.res5.*``)."""
    placed = {}
    for key in model_state:
        for prefix in (("backbone.bottom_up.",) if fpn else ("backbone.", "roi_heads.")):
            if key.startswith(prefix) and key[len(prefix):].startswith(("stem.", "res")):
                placed[key[len(prefix):]] = key
    return placed


@pytest.mark.parametrize("form", RELEASED_FORMS)
def test_every_released_form_loads_into_detectron2s_r50_c4_voc_model(form, released, tmp_path):
    """Loaded by Detectron2's own checkpointer: every exported tensor found, equal to the source."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer

    path, state = released[form]
    convert(path, tmp_path / "out.pkl")
    model = detectron2_model("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml")
    DetectionCheckpointer(model).load(str(tmp_path / "out.pkl"))
    model_state = model.state_dict()
    placed = resnet_tensors_in(model_state, fpn=False)
    assert set(placed) == expected_detectron2_names(BLOCKS[50])
    exported_model = read_pickle(tmp_path / "out.pkl")["model"]
    unequal = [name for name, array in exported_model.items()
               if not torch.equal(model_state[placed[name]], torch.from_numpy(array))]
    assert not unequal and len(exported_model) == 265, unequal[:5]
    assert torch.equal(model_state["roi_heads.res5.2.conv3.norm.running_var"], state["layer4.2.bn3.running_var"])


@pytest.mark.parametrize("config, depth", [
    ("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", 50),
    ("PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml", 50),
    ("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", 101),
])
def test_export_loads_into_detectron2(config, depth, exported):
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer

    model = detectron2_model(config, depth)
    DetectionCheckpointer(model).load(str(exported[depth]))
    model_state = model.state_dict()
    placed = resnet_tensors_in(model_state, fpn="FPN" in config)
    exported_model = read_pickle(exported[depth])["model"]
    # Every exported tensor has a place in the model, and every ResNet tensor of the model
    # is one of them: Detectron2 itself only logs the names it could not match.
    assert set(placed) == set(exported_model)
    assert len(placed) == TENSOR_COUNTS[depth]
    unequal = [name for name, array in exported_model.items()
               if not torch.equal(model_state[placed[name]], torch.from_numpy(array))]
    assert not unequal, f"{len(unequal)} tensors not loaded, e.g. {unequal[:5]}"
