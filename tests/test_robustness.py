"""FGSM: the attack's arithmetic, and tools/eval_robustness.py on a tiny model trained on
synthetic CIFAR data: the attack lowers its accuracy, epsilon 0 leaves it unchanged."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from cifar_archive import cifar_cfg, write_cifar
from pretrain.engine import PretrainTrainer
from pretrain.robustness import Normalized, evaluate_fgsm, fgsm
from tool_process import run_tool

REPO = Path(__file__).resolve().parents[1]


def test_fgsm_moves_every_pixel_by_epsilon_within_the_valid_range():
    torch.manual_seed(0)
    model = Normalized(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)),
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.rand(4, 3, 8, 8)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0
    labels = torch.tensor([0, 1, 2, 0])
    model(images)  # materialise the lazy layer
    logits, adversarial = fgsm(model, images, labels, epsilon=4)
    assert torch.equal(logits, model(images).detach())
    step = (adversarial - images).abs()
    inside = (images > 4 / 255) & (images < 1 - 4 / 255)
    assert torch.allclose(step[inside], torch.full_like(step[inside], 4 / 255), atol=1e-6)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    # The step goes up the loss: the loss on the attacked images is higher.
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adversarial), labels) > loss(model(images), labels)
    assert torch.equal(fgsm(model, images, labels, epsilon=0)[1], images)
    with pytest.raises(ValueError, match="epsilon must be at least 0"):
        evaluate_fgsm(model, [], None, -1, torch.device("cpu"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A WideResNet-10-2 trained to tell five faintly coloured squares apart; its run folder."""
    folder = tmp_path_factory.mktemp("robustness")
    root = write_cifar(folder / "data", train=300, test=100, classes=5, contrast=0.15)
    cfg = cifar_cfg(root, folder / "run", "MIX.NAME", "none", "MODEL.ARCH", "wideresnet10_2",
                    "SOLVER.BATCH_SIZE", "30", "SOLVER.EPOCHS", "8", "SOLVER.STEP_EPOCHS", "(6,)",
                    "SOLVER.BASE_LR", "0.2", "TEST.EVAL_PERIOD", "0")
    PretrainTrainer(cfg).train()
    (folder / "run" / "config.yaml").write_text(cfg.dump())
    return folder / "run"


def eval_robustness(run: Path, *arguments: str) -> subprocess.CompletedProcess:
    return run_tool("tools/eval_robustness.py", "--config-file", run / "config.yaml", *arguments)


def evaluate(run: Path, *arguments: str) -> None:
    finished = eval_robustness(run, *arguments)
    assert finished.returncode == 0, finished.stderr


def test_fgsm_lowers_the_accuracy_of_a_trained_model_and_epsilon_0_does_not(trained_run):
    evaluate(trained_run, "--epsilon", "0")
    evaluate(trained_run, "--epsilon", "8", "MODEL.WEIGHTS", str(trained_run / "model_final.pth"))
    unattacked = json.loads((trained_run / "checkpoint_00000080_fgsm_eps0.json").read_text())
    attacked = json.loads((trained_run / "model_final_fgsm_eps8.json").read_text())
    assert unattacked["images"] == attacked["images"] == 100
    assert unattacked["clean_top1_accuracy"] >= 80  # the model learned the task
    assert unattacked["fgsm_top1_accuracy"] == unattacked["clean_top1_accuracy"]
    assert attacked["clean_top1_accuracy"] == unattacked["clean_top1_accuracy"]  # final = last checkpoint
    assert attacked["fgsm_top1_accuracy"] <= attacked["clean_top1_accuracy"] - 20
    assert attacked["epsilon"] == 8 and attacked["method"] == "none"


def test_eval_robustness_names_missing_weights(trained_run):
    finished = eval_robustness(trained_run, "MODEL.WEIGHTS", str(trained_run / "nothing.pth"))
    assert finished.returncode != 0 and "MODEL.WEIGHTS" in finished.stderr and "nothing.pth" in finished.stderr
