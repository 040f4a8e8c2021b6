"""Detectron2's SGD parameter groups and ``WarmupMultiStepLR`` schedule for torchvision's detector."""
from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

NORM_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the trainable norms this detector can hold


def lr_multiplier(cfg, iteration: int) -> float:
    """The factor on ``BASE_LR`` at 0-based ``iteration``, as Detectron2's ``WarmupMultiStepLR``:
    x ``GAMMA`` at each of ``STEPS`` reached (steps beyond ``MAX_ITER`` ignored), ramped up from
    ``WARMUP_FACTOR`` over the first ``WARMUP_ITERS``."""
    solver = cfg.SOLVER
    steps = [step for step in solver.STEPS if step <= solver.MAX_ITER]

    def decay(at: int) -> float:
        return solver.GAMMA ** bisect.bisect_right(steps, at)

    warmup_iters = min(solver.WARMUP_ITERS, solver.MAX_ITER)
    if iteration >= warmup_iters:
        return decay(iteration)
    start = solver.WARMUP_FACTOR * decay(0)
    method = solver.WARMUP_METHOD
    if method == "constant":
        return start
    if method != "linear":
        raise ValueError(f"SOLVER.WARMUP_METHOD {method!r}: choose linear or constant")
    return start + (decay(warmup_iters) - start) * iteration / warmup_iters


def check_schedule(cfg) -> None:
    """Refuse a schedule this engine would not follow; warn about steps past the end."""
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name != "WarmupMultiStepLR":
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME {name!r}: the torchvision engine runs WarmupMultiStepLR")
    late = [step for step in cfg.SOLVER.STEPS if step > cfg.SOLVER.MAX_ITER]
    if late:
        logger.warning("SOLVER.STEPS %s lie beyond SOLVER.MAX_ITER %d and are ignored", late, cfg.SOLVER.MAX_ITER)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.SGD:
    """SGD over the trainable parameters, with Detectron2's parameter groups: norm layers get
    ``WEIGHT_DECAY_NORM``, biases ``BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` when set."""
    solver = cfg.SOLVER
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            decay = solver.WEIGHT_DECAY_NORM if isinstance(module, NORM_MODULES) else solver.WEIGHT_DECAY
            factor = 1.0
            if name == "bias":
                factor = solver.BIAS_LR_FACTOR
                decay = decay if solver.WEIGHT_DECAY_BIAS is None else solver.WEIGHT_DECAY_BIAS
            groups.setdefault((factor, decay), []).append(parameter)
    return torch.optim.SGD([{"params": params, "lr_factor": factor, "weight_decay": decay}
                            for (factor, decay), params in groups.items()],
                           lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV)


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg, iteration: int) -> float:
    """Set every group's lr for ``iteration``; returns the base lr's value."""
    lr = cfg.SOLVER.BASE_LR * lr_multiplier(cfg, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_factor"]
    return lr
