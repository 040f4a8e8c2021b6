"""The demo pipeline end to end at a tiny scale, through the same entry point as `make demo`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detection import records

REPO = Path(__file__).resolve().parents[1]


def run_demo(output: Path, engine: str = "torchvision") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools/demo.py"), "--scale", "tiny", "--engine", engine,
                           "--output", str(output)], capture_output=True, text=True, timeout=900, cwd=REPO)


def test_demo_runs_every_stage_then_skips_or_resumes_them_when_run_again(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for method in ("none", "saliencymix"):
        assert (tmp_path / f"pretrain_{method}" / "model_final.pth").is_file()
        assert (tmp_path / f"pretrain_{method}" / "backbone.pth").is_file()
        run = records.read_run(tmp_path / f"detect_{method}")
        assert run["info"]["method"] == method and run["info"]["engine"] == "torchvision"
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert (tmp_path / "comparison.png").is_file() and "saliencymix" in first.stdout
    assert json.dumps(comparison).count("saliencymix") >= 1
    assert "[1/8] generate the built-in data" in first.stdout

    again = run_demo(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 7  # every stage but the comparison is skipped

    interrupted = tmp_path / "pretrain_saliencymix"
    (interrupted / "model_final.pth").unlink()  # as if killed after its last periodic checkpoint
    resumed = run_demo(tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "pretrain ResNet-50, mixing: saliencymix (resuming)" in resumed.stdout
    assert f"resumed from {interrupted / 'checkpoint_'}" in resumed.stdout
    assert (interrupted / "model_final.pth").is_file() and resumed.stdout.count("done already") == 6


def test_demo_runs_with_detectron2_when_installed(tmp_path):
    pytest.importorskip("detectron2")
    finished = run_demo(tmp_path, engine="detectron2")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for method in ("none", "saliencymix"):
        assert (tmp_path / f"pretrain_{method}" / "backbone.pkl").is_file()
        run = records.read_run(tmp_path / f"detect_{method}")
        assert run["info"]["method"] == method and run["info"]["engine"] == "detectron2"
    assert (tmp_path / "comparison.png").is_file()
