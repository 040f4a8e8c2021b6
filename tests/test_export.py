"""Tests of ``pretrain.weights``, ``pretrain.export`` and ``tools/convert_to_d2.py``: reading a
ResNet checkpoint and the torchvision -> Detectron2 ResNet export.

The sources are real torchvision ResNets (random init, nothing downloaded) whose BN running
statistics are randomised too, so no exported tensor equals a freshly initialised one: a tensor
equal to its source after loading has really been loaded. The Detectron2 tests at the end are
skipped when Detectron2 is not installed.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pretrain.atomic_file import atomic_write
from pretrain.export import convert, detectron2_to_torchvision
from pretrain.weights import (
    WeightsError,
    is_backbone_tensor,
    load_resnet_state_dict,
    resnet_depth,
    strip_wrapper_prefixes,
)

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
    assert load_resnet_state_dict(tmp_path / "ckpt.pth").kind == "checkpoint"


def assert_same_pickle(path: Path, reference: Path) -> None:
    model, expected = read_pickle(path)["model"], read_pickle(reference)["model"]
    assert set(model) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(model[name], expected[name], err_msg=name)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a loadable PyTorch checkpoint"),
    ([1, 2, 3], "holds list"),
    ({"conv1.weight": "text"}, "entry 'conv1.weight' is a str"),
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
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


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
