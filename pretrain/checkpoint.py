"""Checkpoints that are never half-written: each is saved to a temporary file in the same folder
and renamed over its final name, so a run killed at any moment leaves the previous ones intact.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.atomic_file import atomic_write
from pretrain.cli import UsageError

LAST_POINTER = "last_checkpoint"
BEST_NAME = "model_best.pth"
FINAL_NAME = "model_final.pth"  # the weights at the end of training, as Detectron2 names them


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda stream: torch.save(state, stream))


def load(path: Path) -> dict:
    """A checkpoint of ours; its contents are plain tensors, numbers and strings."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error


class Checkpointer:
    """Keeps the last ``keep_last`` periodic checkpoints of a run folder, a pointer file naming
    the newest, and the best one by a metric."""

    def __init__(self, directory: Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"CHECKPOINT.KEEP_LAST must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, name: str, state: dict) -> Path:
        path = self.directory / name
        save(path, state)
        atomic_write(self.directory / LAST_POINTER, lambda stream: stream.write(name.encode()))
        self._prune(keep=path)
        return path

    def save_best(self, state: dict) -> Path:
        path = self.directory / BEST_NAME
        save(path, weights_only(state))
        return path

    def last(self) -> Path | None:
        """The newest checkpoint, or None for a fresh run folder."""
        pointer = self.directory / LAST_POINTER
        if not pointer.exists():
            return None
        path = self.directory / pointer.read_text().strip()
        if not path.exists():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
        return path

    def _prune(self, keep: Path) -> None:
        periodic = sorted(p for p in self.directory.glob("checkpoint_*.pth") if p != keep)
        for old in periodic[:max(0, len(periodic) - (self.keep_last - 1))]:
            old.unlink()


def weights_only(state: dict) -> dict:
    """A state to read, not to resume: without the SGD momentum (as large as the weights) and
    the loss scaler (best and final weights, rewritten often or kept for good)."""
    return {key: value for key, value in state.items() if key not in ("optimizer", "scaler")}


def checkpoint_name(iteration: int) -> str:
    """Names sort in training order."""
    return f"checkpoint_{iteration:08d}.pth"


def weights_to_evaluate(weights: str, output_dir: str) -> Path:
    """``MODEL.WEIGHTS`` when set, else the newest checkpoint of the run folder ``OUTPUT_DIR``."""
    path = Path(weights) if weights else Checkpointer(Path(output_dir), keep_last=1).last()
    if path is None:
        raise UsageError(f"no weights to evaluate: set MODEL.WEIGHTS or train into {output_dir} first")
    if not path.is_file():
        raise UsageError(f"MODEL.WEIGHTS {path} does not exist")
    return path
