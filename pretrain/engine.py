"""The ImageNet pretraining loop: one ``PretrainTrainer`` per process, configured by a CfgNode.

It trains a torchvision ResNet with a batch mixer against soft targets, writes resumable
checkpoints, evaluates top-1/top-5 error and logs metrics as JSON lines and TensorBoard events.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from helpers import preemption
from helpers.distributed import all_gather_objects, all_reduce_sum, local_device, report_cpus
from helpers.metrics_file import drop_records_after
from pretrain import checkpoint as ckpt
from pretrain.atomic_file import atomic_write
from pretrain.data import build_train_loader, build_val_loader, per_process_batch, unreadable_paths, world
from pretrain.device_pipeline import batch_preparer
from pretrain.evaluation import classification_errors
from pretrain.losses import soft_target_cross_entropy
from pretrain.mix import BatchMixer, build_mixer_from_config
from pretrain.models import build_model

logger = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BAD_IMAGES = "bad_images.txt"  # the unreadable training files of a run, one path per line
IMAGE_INDEX = "image_index"  # the run folder's ImageFolder indexes (pretrain/image_index.py)


def build_lr_schedule(cfg, iterations_per_epoch: int) -> ParamScheduler:
    """The lr multiplier as a function of training progress in [0, 1) (fvcore's convention)."""
    solver = cfg.SOLVER
    total = solver.EPOCHS * iterations_per_epoch
    if solver.SCHEDULE == "step":
        milestones = [int(epoch * iterations_per_epoch) for epoch in solver.STEP_EPOCHS]
        if milestones != sorted(milestones) or any(not 0 < m < total for m in milestones):
            raise ValueError(f"SOLVER.STEP_EPOCHS {list(solver.STEP_EPOCHS)} must increase within "
                             f"(0, SOLVER.EPOCHS={solver.EPOCHS})")
        main = MultiStepParamScheduler([solver.GAMMA ** k for k in range(len(milestones) + 1)],
                                       num_updates=total, milestones=milestones)
    elif solver.SCHEDULE == "cosine":
        main = CosineParamScheduler(1.0, 0.0)
    else:
        raise ValueError(f"unknown SOLVER.SCHEDULE {solver.SCHEDULE!r}; choose one of {SCHEDULES}")
    warmup = solver.WARMUP_EPOCHS / solver.EPOCHS
    if warmup <= 0:
        return main
    if warmup >= 1:
        raise ValueError(f"SOLVER.WARMUP_EPOCHS {solver.WARMUP_EPOCHS} must be below SOLVER.EPOCHS")
    ramp = LinearParamScheduler(solver.WARMUP_FACTOR * main(0.0), main(warmup))
    return CompositeParamScheduler([ramp, main], lengths=[warmup, 1 - warmup],
                                   interval_scaling=["rescaled", "fixed"])


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The dtype the training step autocasts to (None: float32). ``SOLVER.AMP`` on CUDA; on a CPU
    only bfloat16 and only where the CPU computes in it natively (AVX-512 BF16 or AMX), where a
    ResNet-50 step took 0.75x the float32 one; elsewhere bfloat16 would be emulated."""
    dtype = AMP_DTYPES.get(cfg.SOLVER.AMP_DTYPE)
    if dtype is None:
        raise ValueError(f"unknown SOLVER.AMP_DTYPE {cfg.SOLVER.AMP_DTYPE!r}; choose one of {tuple(AMP_DTYPES)}")
    if not cfg.SOLVER.AMP:
        return None
    if device.type == "cuda":
        return dtype
    native_bfloat16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype if dtype == torch.bfloat16 and native_bfloat16 else None


def build_optimizer(cfg, model: torch.nn.Module) -> tuple[torch.optim.SGD, list[float]]:
    """SGD over two parameter groups, the network and its classifier (``model.fc``), and each
    group's factor on the scheduled lr (1 and ``SOLVER.HEAD_LR_FACTOR``)."""
    head = list(model.fc.parameters())
    in_head = {id(parameter) for parameter in head}
    body = [parameter for parameter in model.parameters() if id(parameter) not in in_head]
    optimizer = torch.optim.SGD([{"params": body}, {"params": head}], lr=cfg.SOLVER.BASE_LR,
                                momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
                                weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return optimizer, [1.0, cfg.SOLVER.HEAD_LR_FACTOR]


def training_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  mixer: BatchMixer, images: torch.Tensor, labels: torch.Tensor,
                  amp_dtype: torch.dtype | None, host_images: torch.Tensor | None = None) -> torch.Tensor:
    """Mix the batch (``host_images``: the batch before its copy to the GPU, which a mixer
    may look at without waiting for it), then one forward, backward and SGD step; the
    (detached) loss."""
    images, targets = mixer(images, labels, host_images)
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with autocast:
        loss = soft_target_cross_entropy(network(images), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def mean_and_standard_error(total: float, square_total: float, count: int) -> tuple[float, float]:
    """The mean of ``count`` values and its standard error, from their sum and sum of squares
    (what all processes' losses reduce to in one all-reduce)."""
    mean = total / count
    variance = max(square_total - count * mean * mean, 0.0) / max(count - 1, 1)
    return mean, math.sqrt(variance / count)


class MetricsWriter:
    """Rank 0's JSON lines (``metrics.json``) and TensorBoard events; other ranks write nothing.
    A run resumed at ``resumed_at`` first forgets what an earlier attempt logged after that
    iteration (it trains those iterations again)."""

    def __init__(self, output_dir: Path, enabled: bool, resumed_at: int = 0):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.json_path = output_dir / "metrics.json"
            dropped = drop_records_after(self.json_path, resumed_at)
            if dropped:
                logger.info("dropped %d metrics.json records logged after iteration %d by an earlier attempt",
                            dropped, resumed_at)
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"),
                                             purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, iteration: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.json_path, "a") as stream:
            stream.write(json.dumps({"iteration": iteration, **values}) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, iteration)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


class PretrainTrainer:
    """Builds everything from ``cfg`` and trains; ``resume`` continues from the run folder's
    last checkpoint. ``after_step`` callables run after every iteration (given the trainer)."""

    def __init__(self, cfg, resume: bool = False):
        self.cfg = cfg
        self.rank, self.world_size = world()
        self.device = local_device()
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.after_step: list[Callable[[PretrainTrainer], None]] = []
        torch.manual_seed(cfg.SEED + self.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks its fastest kernels once

        pin = self.device.type == "cuda"
        report_cpus(cfg.DATA.NUM_WORKERS)
        index_cache = Path(cfg.OUTPUT_DIR) / IMAGE_INDEX  # the folders' file lists, for every process and attempt
        self.dataset, self.sampler, self.loader = build_train_loader(cfg, pin_memory=pin, index_cache=index_cache)
        self.val_loader = build_val_loader(cfg, pin_memory=pin, index_cache=index_cache)
        self.prepare_train = batch_preparer(cfg, train=True, device=self.device)
        self.prepare_val = batch_preparer(cfg, train=False, device=self.device)
        self.iterations_per_epoch = len(self.loader)
        self.total_iterations = cfg.SOLVER.EPOCHS * self.iterations_per_epoch
        self.max_iterations = min(cfg.SOLVER.MAX_ITER or self.total_iterations, self.total_iterations)
        self.batch_per_process = per_process_batch(cfg.SOLVER.BATCH_SIZE, self.world_size, "SOLVER.BATCH_SIZE")

        self.memory_format = torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format
        self.model = build_model(cfg).to(self.device, memory_format=self.memory_format)
        self.optimizer, self.lr_factors = build_optimizer(cfg, self.model)
        self.base_lr = cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256
        self.schedule = build_lr_schedule(cfg, self.iterations_per_epoch)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        logger.info("training precision: %s", f"{self.amp_dtype} autocast" if self.amp_dtype else "float32")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixer = build_mixer_from_config(cfg, torch.Generator().manual_seed(cfg.SEED * 1000 + self.rank))

        network = self.model
        if self.world_size > 1:
            network = DistributedDataParallel(network, device_ids=[self.device.index] if pin else None)
        self.network = torch.compile(network) if cfg.MODEL.COMPILE else network

        self.checkpointer = ckpt.Checkpointer(self.output_dir, cfg.CHECKPOINT.KEEP_LAST)
        self.iteration = 0
        self.best_top1_error = math.inf
        self.unreadable: set[str] = set()  # training files this process found unreadable
        self.replacements = 0  # how often this process replaced one (again in every epoch)
        self.last_checkpoint: Path | None = None
        self.evaluation_due = False  # saved on a stop signal before the evaluation of the epoch it ended
        self.last_save = time.monotonic()
        if resume:
            self.resume()
        self.metrics = MetricsWriter(self.output_dir, enabled=self.rank == 0, resumed_at=self.iteration)
        self.stop = preemption.StopAgreement()
        self.show_progress = self.rank == 0 and sys.stderr.isatty()  # no progress bars in a job's log file

    # ------------------------------------------------------------------------------ training
    def train(self) -> dict:
        """Train to ``SOLVER.MAX_ITER`` (or the end of ``SOLVER.EPOCHS``); the last evaluation."""
        losses: list[tuple[int, torch.Tensor]] = []  # since the last log line, with its wall and data-wait seconds
        seconds = waited = 0.0
        # owed by an attempt that saved on a stop signal, or killed at the end before its evaluation
        owed = self.evaluation_due or self.iteration >= self.max_iterations
        result = self.evaluate_and_keep_best() if owed else {}
        while self.iteration < self.max_iterations:
            epoch, start = divmod(self.iteration, self.iterations_per_epoch)
            self.sampler.set_epoch(epoch, start * self.batch_per_process)
            self.network.train()
            progress = tqdm(total=self.iterations_per_epoch, initial=start, desc=f"epoch {epoch}",
                            disable=not self.show_progress, dynamic_ncols=True, leave=False)
            tick = fetch_start = time.perf_counter()  # evaluation time is not training time
            for batch, labels, unreadable in self.loader:
                waited += time.perf_counter() - fetch_start
                loss, undecodable = self._step(batch, labels)
                losses.append((self.iteration, loss))
                found = unreadable_paths(unreadable) + undecodable
                self.unreadable.update(found)
                self.replacements += len(found)
                self.iteration += 1
                progress.update()
                for hook in self.after_step:
                    hook(self)
                now = time.perf_counter()
                seconds, tick = seconds + now - tick, now
                if self.iteration % self.cfg.LOG_PERIOD == 0:
                    self._log_window(losses, seconds, waited, progress)
                    losses, waited, seconds = [], 0.0, 0.0
                stop_signal, time_due = self.stop.poll(checkpoint_due=self._checkpoint_time())
                if stop_signal and self.iteration < self.max_iterations:  # the last one ends the run anyway
                    self._save_and_stop(stop_signal, losses, seconds, waited, progress)
                period = self.cfg.CHECKPOINT.PERIOD
                epoch_done = self.iteration % self.iterations_per_epoch == 0
                if (time_due or (period and self.iteration % period == 0) or (epoch_done and self.cfg.CHECKPOINT.EPOCH_END)
                        or self.iteration == self.max_iterations):
                    self._check_finite(losses)
                    self.save_checkpoint()
                if epoch_done or self.iteration >= self.max_iterations:
                    break
                fetch_start = time.perf_counter()
            progress.close()
            if self.iteration >= self.max_iterations or self._evaluation_due_now():
                result = self.evaluate_and_keep_best()
        self.stop.close()
        final = self._state()
        bad = final["metrics"]["unreadable_train_images"]
        replacements = sum(final["metrics"]["train_image_replacements"])
        if self.rank == 0:
            ckpt.save(self.output_dir / ckpt.FINAL_NAME, ckpt.weights_only(final))
            self._write_bad_images(bad)
            logger.info("training done at iteration %d; %d unreadable training files%s, replaced %d times",
                        self.iteration, len(bad), f" (listed in {self.output_dir / BAD_IMAGES})" if bad else "",
                        replacements)
        self.metrics.write(self.iteration, bad_train_images=len(bad), train_image_replacements=replacements)
        self.metrics.close()
        return {**result, "bad_train_images": len(bad), "train_image_replacements": replacements}

    def _step(self, batch, labels: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """One training step on a loader batch: its loss, and the files found undecodable in it."""
        images, labels, undecodable, host_images = self.prepare_train(batch, labels)
        images = images.contiguous(memory_format=self.memory_format)
        lr = self.base_lr * self.schedule(self.iteration / self.total_iterations)
        for group, factor in zip(self.optimizer.param_groups, self.lr_factors):
            group["lr"] = lr * factor
        loss = training_step(self.network, self.optimizer, self.scaler, self.mixer, images, labels, self.amp_dtype,
                             host_images)
        return loss, undecodable

    def _save_and_stop(self, signal_name: str, losses, seconds: float, waited: float, progress) -> None:
        """The cluster takes the machines back: log the iterations since the last log line, save
        here (noting an evaluation this epoch's end still owes), and end every process together."""
        if losses:
            self._log_window(losses, seconds, waited, progress)
        self.save_checkpoint(evaluation_due=self._evaluation_due_now())
        progress.close()
        self.metrics.close()
        self.stop.end_run(self.last_checkpoint, signal_name, self.iteration)

    def _checkpoint_time(self) -> bool:
        """Whether ``CHECKPOINT.PERIOD_MINUTES`` have passed since the last checkpoint (rank 0's
        clock decides, through the stop agreement, so that every process saves together)."""
        minutes = self.cfg.CHECKPOINT.PERIOD_MINUTES
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def _evaluation_due_now(self) -> bool:
        """Whether the epoch that ends at this iteration is evaluated (``TEST.EVAL_PERIOD``)."""
        epochs, within = divmod(self.iteration, self.iterations_per_epoch)
        period = self.cfg.TEST.EVAL_PERIOD
        return within == 0 and bool(period) and epochs % period == 0

    def _check_finite(self, losses: list[tuple[int, torch.Tensor]]) -> None:
        """Stop every process together when any saw a NaN or infinite loss since the last
        check; no checkpoint is written after it, so the last one stays good."""
        bad = [(iteration, float(loss)) for iteration, loss in losses if not math.isfinite(float(loss))]
        first = bad[0][0] if bad else self.max_iterations + 1
        reports = all_gather_objects((first, bad[0][1] if bad else None))
        first, value = min(reports, key=lambda report: report[0])
        if value is not None:
            previous = self.last_checkpoint or "none written yet"
            raise FloatingPointError(f"loss became {value} at iteration {first + 1}; training stopped. "
                                     f"Last good checkpoint: {previous}")

    def _log_window(self, losses, seconds: float, waited: float, progress) -> None:
        """One metrics line for the iterations since the last: mean loss and its standard error
        (what pretrain/convergence.py weighs a rise against), lr, throughput, the mean wait for
        data, and the window's iterations and wall seconds (what tools/cost_report.py adds up)."""
        self._check_finite(losses)
        window = [float(loss) for _, loss in losses]
        loss_sum, square_sum, count, data_time = all_reduce_sum(
            [sum(window), sum(loss * loss for loss in window), len(window), waited], self.device)
        mean, standard_error = mean_and_standard_error(loss_sum, square_sum, count)
        images_per_second = len(losses) * self.cfg.SOLVER.BATCH_SIZE / max(seconds, 1e-9)
        values = dict(loss=mean, loss_standard_error=standard_error,
                      lr=self.optimizer.param_groups[0]["lr"],
                      images_per_second=images_per_second,
                      data_time=data_time / self.world_size / max(len(losses), 1),
                      epoch=self.iteration / self.iterations_per_epoch,
                      iterations_per_epoch=self.iterations_per_epoch,
                      window_iterations=len(losses), window_seconds=seconds)
        if self.show_progress:
            progress.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.4g}", ips=f"{images_per_second:.0f}")
        elif self.rank == 0:  # a log line per window instead of a bar redrawn in a log file
            logger.info("epoch %.2f  iteration %d/%d  loss %.4f  lr %.4g  %.0f images/s  data %.3f s/it", values["epoch"],
                        self.iteration, self.max_iterations, mean, values["lr"], images_per_second, values["data_time"])
        self.metrics.write(self.iteration, **values)

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 and top-5 error (percent) on the validation folder, with rank 0's BN statistics
        on every process: the error reported is that of the weights rank 0 saves."""
        self.model.eval()
        if self.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        result = classification_errors(self.model, self.val_loader, self.prepare_val, self.device,
                                       self.memory_format)
        self.model.train()
        return result

    def evaluate_and_keep_best(self) -> dict:
        result = self.evaluate()
        self.metrics.write(self.iteration, epoch=self.iteration / self.iterations_per_epoch, **result)
        if self.rank == 0:
            logger.info("iteration %d: top-1 error %.2f%%, top-5 error %.2f%% on %d images",
                        self.iteration, result["top1_error"], result["top5_error"], result["val_images"])
        if result["top1_error"] < self.best_top1_error:
            self.best_top1_error = result["top1_error"]
            state = self._state()
            if self.rank == 0:
                self.checkpointer.save_best(state)
        return result

    # --------------------------------------------------------------------------- checkpoints
    def _state(self, evaluation_due: bool = False) -> dict:
        """Everything needed to continue exactly where this iteration ends (a collective call:
        every process contributes its own mixer random state)."""
        rng = {"torch": all_gather_objects(torch.get_rng_state()),
               "mixers": all_gather_objects(self.mixer.generator.get_state())}
        if self.device.type == "cuda":
            rng["cuda"] = all_gather_objects(torch.cuda.get_rng_state(self.device))
        unreadable = sorted(set().union(*all_gather_objects(self.unreadable)))
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {"iteration": self.iteration, "total_iterations": self.total_iterations},
                "scaler": self.scaler.state_dict(), "epoch": self.iteration // self.iterations_per_epoch,
                "iteration": self.iteration,
                "sampler": {"epoch": self.iteration // self.iterations_per_epoch,
                            "position": (self.iteration % self.iterations_per_epoch) * self.batch_per_process},
                "rng": rng, "cfg": self.cfg.dump(), "world_size": self.world_size,
                "evaluation_due": evaluation_due,
                "metrics": {"best_top1_error": self.best_top1_error, "unreadable_train_images": unreadable,
                            "train_image_replacements": all_gather_objects(self.replacements)}}

    def save_checkpoint(self, evaluation_due: bool = False) -> None:
        self.last_save = time.monotonic()
        state = self._state(evaluation_due)
        if self.rank == 0:
            self.last_checkpoint = self.checkpointer.save(ckpt.checkpoint_name(self.iteration), state)
            self._write_bad_images(state["metrics"]["unreadable_train_images"])

    def _write_bad_images(self, paths: list[str]) -> None:
        """The unreadable files of every process and every earlier attempt of this run."""
        if paths:
            atomic_write(self.output_dir / BAD_IMAGES, lambda stream: stream.write("".join(
                f"{path}\n" for path in paths).encode()))

    def resume(self) -> None:
        """Continue from the run folder's last checkpoint; a fresh folder starts from scratch."""
        path = self.checkpointer.last()
        if path is None:
            if self.rank == 0:
                logger.info("no checkpoint in %s: starting from scratch", self.output_dir)
            return
        state = ckpt.load(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes; this run has "
                             f"{self.world_size}: resume with the same process count")
        groups = len(state["optimizer"]["param_groups"])
        if groups != len(self.optimizer.param_groups):
            raise ValueError(f"{path} holds SGD state for {groups} parameter group(s); this version keeps "
                             f"{len(self.optimizer.param_groups)} (network, classifier): resume with the "
                             "version that wrote it")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        torch.set_rng_state(state["rng"]["torch"][self.rank])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][self.rank], self.device)
        self.mixer.generator.set_state(state["rng"]["mixers"][self.rank])
        self.best_top1_error = state["metrics"]["best_top1_error"]
        self.unreadable = set(state["metrics"]["unreadable_train_images"])
        self.replacements = state["metrics"]["train_image_replacements"][self.rank]
        self.evaluation_due = state.get("evaluation_due", False)
        self.last_checkpoint = path
        if self.rank == 0:
            logger.info("resumed from %s at iteration %d", path, self.iteration)
