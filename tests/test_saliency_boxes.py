"""``tools/saliency_boxes.py``: where SaliencyMix's box lands, as published and as described."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tool_process import run_tool

cv2 = pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]


def test_the_tool_draws_both_placements_and_writes_its_figures(tmp_path):
    """On a folder of images: a PNG and a JSON of the figures, one crop per --crops per image."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "out" / "boxes.png"
    result = run_tool("tools/saliency_boxes.py", folder, "--crops", "3", "--size", "64", "--top-rows", "8",
                      "--examples", "2", "--output", output)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.with_suffix(".json").read_text())
    assert figures["images"] == 2 and figures["crops"] == 6
    assert 0 <= figures["official_peaks_in_top_8_rows"] <= 6 and 0 <= figures["pixels_peaks_in_top_8_rows"] <= 6
    assert -1 <= figures["r_official_vs_pixels_mean"] <= 1
    assert output.stat().st_size > 0 and f"wrote {output}" in result.stdout


def test_an_empty_folder_is_one_error_line(tmp_path):
    result = run_tool("tools/saliency_boxes.py", tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: no images"), result.stderr
