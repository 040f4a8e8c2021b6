"""The fine-tuning loop, its hooks in Detectron2's order (PreciseBN, checkpoint, evaluation),
its ``metrics.json`` rows and its resumable checkpoints."""
from __future__ import annotations

import json
import logging
import math
import secrets
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detection.torchvision_engine.data import training_batches
from detection.torchvision_engine.inference import evaluate, evaluate_model, flatten_results
from detection.torchvision_engine.model import build_detector, build_model, select_device
from detection.torchvision_engine.solver import build_optimizer, check_schedule, set_learning_rate
from helpers import preemption
from helpers.distributed import all_gather_objects, all_reduce_sum, report_cpus
from helpers.metrics_file import drop_records_after
from pretrain import checkpoint as ckpt
from pretrain.data import world

logger = logging.getLogger(__name__)

ENGINE = "torchvision"
LOG_PERIOD = 20  # iterations per log line and metrics.json row, as Detectron2's writers
METRICS_FILE = "metrics.json"
KEEP_ALL_CHECKPOINTS = sys.maxsize  # Detectron2's PeriodicCheckpointer deletes none
PRECISE_BN_STREAM = 1  # seed offset: PreciseBN draws its images apart from the training stream
# torchvision's loss names -> Detectron2's, so both engines' metrics.json read alike.
DETECTRON2_LOSS_NAMES = {"loss_classifier": "loss_cls", "loss_box_reg": "loss_box_reg",
                         "loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_loc"}


def train(cfg, resume: bool = False) -> dict:
    """Fine-tune (see ``TorchvisionTrainer``), then evaluate ``model_final.pth`` as ``evaluate``
    does, so that every process scores the weights rank 0 saved."""
    TorchvisionTrainer(cfg, resume).train()
    return evaluate(cfg)


class TorchvisionTrainer:
    """Fine-tunes for ``SOLVER.MAX_ITER`` iterations into ``OUTPUT_DIR``; with ``resume``, from
    its last checkpoint (a folder without one starts from ``MODEL.WEIGHTS``)."""

    def __init__(self, cfg, resume: bool = False):
        self.cfg = cfg
        self.rank, self.world_size = world()
        self.device = select_device(cfg.MODEL.DEVICE)
        check_schedule(cfg)
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.checkpointer = ckpt.Checkpointer(self.output_dir, KEEP_ALL_CHECKPOINTS)
        last = self.checkpointer.last() if resume else None
        state = read_training_checkpoint(last) if last else None
        self.seed = state["seed"] if state else resolve_seed(cfg.SEED)
        torch.manual_seed(self.seed + self.rank)
        model = (build_detector(cfg) if state else build_model(cfg)).to(self.device)
        self.model = self.with_synchronized_batchnorm(model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.start = self.restore(state, last) if state else 0
        self.network = self.across_processes(self.model)
        if self.rank == 0 and self.start:  # rows an earlier attempt logged after its checkpoint: trained again
            drop_records_after(self.output_dir / METRICS_FILE, self.start - 1)
        self.stop = preemption.StopAgreement()
        report_cpus(cfg.DATALOADER.NUM_WORKERS)

    def train(self) -> None:
        cfg = self.cfg
        batches = training_batches(cfg, self.seed, self.start * cfg.SOLVER.IMS_PER_BATCH, self.device)
        self.model.train()
        window: list[dict[str, float]] = []
        for iteration in range(self.start, cfg.SOLVER.MAX_ITER):
            began = time.perf_counter()
            lr = set_learning_rate(self.optimizer, cfg, iteration)
            images, targets = next(batches)
            loaded = time.perf_counter()
            losses = self.step(images, targets, iteration)
            window.append({**losses, "lr": lr, "time": time.perf_counter() - began, "data_time": loaded - began})
            done = iteration + 1
            if done % LOG_PERIOD == 0 or done == cfg.SOLVER.MAX_ITER:
                self.write_training_metrics(window, iteration)
                window = []
            saved = self.after_step(done)
            stop_signal, _ = self.stop.poll()
            if stop_signal and done < cfg.SOLVER.MAX_ITER:
                self.save_and_stop(stop_signal, window, iteration, done, saved)
        self.stop.close()
        if self.start >= cfg.SOLVER.MAX_ITER and self.rank == 0:
            logger.info("%s is already at iteration %d of %d: nothing to train", self.checkpointer.last(),
                        self.start, cfg.SOLVER.MAX_ITER)
        if dist.is_initialized():
            dist.barrier()  # every process's evaluate() must find rank 0's model_final.pth written

    def save_and_stop(self, signal_name: str, window: list[dict[str, float]], iteration: int, done: int,
                      saved: bool) -> None:
        """The cluster takes the machines back: log the window so far, save after ``done``
        iterations (unless ``after_step`` just ``saved``) and end every process together."""
        if window:
            self.write_training_metrics(window, iteration)
        name = ckpt.checkpoint_name(done)
        if not saved:
            self.save_checkpoint(name, done)
        self.stop.end_run(self.output_dir / name, signal_name, done)

    # ------------------------------------------------------------------------------- set-up
    def with_synchronized_batchnorm(self, model: nn.Module) -> nn.Module:
        """SyncBN across the processes when ``MODEL.RESNETS.NORM`` asks for it and they are GPUs."""
        if self.cfg.MODEL.RESNETS.NORM != "SyncBN" or self.world_size == 1:
            return model
        if self.device.type != "cuda":
            logger.warning("MODEL.RESNETS.NORM SyncBN needs CUDA: each CPU process normalises its own batch")
            return model
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def across_processes(self, model: nn.Module) -> nn.Module:
        """DDP when several processes train; buffers are made equal once, not at every forward, so
        each process's BN keeps its own running statistics (Detectron2's ``broadcast_buffers=False``)."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       forward_sync_buffers=False)

    # -------------------------------------------------------------------------------- steps
    def step(self, images: list, targets: list, iteration: int) -> dict[str, float]:
        """One SGD step; the losses averaged over the processes, under Detectron2's names. A NaN or
        infinite loss stops every process before the step, so no checkpoint holds its damage."""
        losses = self.network(images, targets)
        total = sum(losses.values())
        names = ["total_loss", *(DETECTRON2_LOSS_NAMES.get(name, name) for name in losses)]
        values = all_reduce_sum(torch.stack([total, *losses.values()]).detach(), total.device)  # one readback
        averaged = {name: value / self.world_size for name, value in zip(names, values)}
        if not math.isfinite(averaged["total_loss"]):
            raise FloatingPointError(f"loss became {averaged} at iteration {iteration}; training stopped. "
                                     f"Last checkpoint: {self.checkpointer.last() or 'none written yet'}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return averaged

    def after_step(self, done: int) -> bool:
        """Detectron2's hooks in their order: PreciseBN, then the checkpoint, then the evaluation.
        The final evaluation is ``train``'s, of ``model_final.pth``. Whether it saved a checkpoint."""
        cfg = self.cfg
        final = done == cfg.SOLVER.MAX_ITER
        eval_due = cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and not final
        if final or eval_due:
            self.recompute_batchnorm_statistics()
        saves = final or (cfg.SOLVER.CHECKPOINT_PERIOD > 0 and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0)
        if saves:
            self.save_checkpoint(ckpt.FINAL_NAME if final else ckpt.checkpoint_name(done), done)
        if eval_due:
            results = evaluate_model(self.model, cfg, self.device)
            if self.rank == 0:
                append_metrics(self.output_dir, {"iteration": done - 1, **flatten_results(results)})
        return saves

    def recompute_batchnorm_statistics(self) -> None:
        """Detectron2's PreciseBN: BN statistics averaged over ``NUM_ITER`` training batches with
        the weights fixed (only with ``TEST.PRECISE_BN.ENABLED`` and a BN that is not frozen)."""
        if not self.cfg.TEST.PRECISE_BN.ENABLED:
            return
        batches = training_batches(self.cfg, self.seed + PRECISE_BN_STREAM, 0, self.device)
        update_bn_stats(DetectorOnBatch(self.model), batches, self.cfg.TEST.PRECISE_BN.NUM_ITER)
        batches.close()

    def write_training_metrics(self, window: list[dict[str, float]], iteration: int) -> None:
        """Rank 0's log line and ``metrics.json`` row: medians over the window (losses, times) and
        the last iteration's lr, at Detectron2's 0-based iteration index."""
        if self.rank != 0:
            return
        row = {"iteration": iteration}
        for name in window[-1]:
            row[name] = window[-1][name] if name == "lr" else statistics.median(step[name] for step in window)
        append_metrics(self.output_dir, row)
        losses = "  ".join(f"{name} {row[name]:.4g}" for name in row if name.startswith(("total_loss", "loss_")))
        max_iter = self.cfg.SOLVER.MAX_ITER
        remaining = (max_iter - iteration - 1) * row["time"]
        logger.info("iter %d/%d  %s  lr %.4g  %.3f s/it (data %.3f s)  eta %s", iteration + 1, max_iter,
                    losses, row["lr"], row["time"], row["data_time"], timedelta(seconds=round(remaining)))

    # -------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, name: str, done: int) -> None:
        """Everything needed to continue after ``done`` iterations (a collective call: every
        process contributes its random state); rank 0 writes it."""
        state = {"engine": ENGINE, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "iteration": done, "seed": self.seed, "rng": all_gather_objects(random_state(self.device)),
                 "world_size": self.world_size, "cfg": self.cfg.dump()}
        if self.rank == 0:
            path = self.checkpointer.save(name, state)
            logger.info("saved %s at iteration %d", path, done)

    def restore(self, state: dict, path: Path) -> int:
        """Model, optimizer and (with the same process count) random state; the iteration reached."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["world_size"] == self.world_size:
            set_random_state(state["rng"][self.rank], self.device)
        else:
            logger.warning("%s was written by %d processes, this run has %d: the random draws restart",
                           path, state["world_size"], self.world_size)
        logger.info("resumed from %s at iteration %d", path, state["iteration"])
        return state["iteration"]


class DetectorOnBatch(nn.Module):
    """fvcore's ``update_bn_stats`` calls ``model(batch)``; the detector wants images, targets."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: tuple[list, list]):
        return self.detector(*batch)


def resolve_seed(configured: int) -> int:
    """``SEED``, or when negative one drawn by rank 0 and shared, so all processes agree."""
    if configured >= 0:
        return configured
    seed = all_gather_objects(secrets.randbelow(2 ** 31))[0]
    logger.info("SEED is %d: using the random seed %d", configured, seed)
    return seed


def append_metrics(output_dir: Path, row: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / METRICS_FILE, "a") as stream:
        stream.write(json.dumps(row) + "\n")


def random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators training draws from (sizes on the CPU; box sampling on the device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def read_training_checkpoint(path: Path) -> dict:
    state = ckpt.load(path)
    if not isinstance(state, dict) or state.get("engine") != ENGINE:
        raise ValueError(f"{path} was not written by the torchvision engine; it cannot be resumed here")
    return state
