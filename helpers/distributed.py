"""Starting one training process per GPU (or per CPU worker), on one machine or several.

Four ways in, one code path after: a single process; ``--num-gpus N`` spawning N local
processes (machine ``--machine-rank`` of ``--num-machines``, meeting at ``--dist-url``);
``torchrun``, which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` itself; or one process per
task of a SLURM job step (``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
meeting at ``MASTER_ADDR:MASTER_PORT``, by default the job's first node and a port derived from
the job id). NCCL is used when CUDA is present, gloo otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import preemption

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def default_argument_parser(description: str, training: bool = True) -> argparse.ArgumentParser:
    """The command line of Detectron2's tools (``default_argument_parser``), for ours; without
    ``training``, for a tool that only evaluates (no ``--resume`` nor ``--eval-only``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config YAML")
    if training:
        parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's last checkpoint")
        parser.add_argument("--eval-only", action="store_true",
                            help="only evaluate MODEL.WEIGHTS (or the last checkpoint)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU workers)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank")
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 (auto: one machine)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def free_local_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Placement(NamedTuple):
    """Where this process sits in a job that its launcher (torchrun, srun) already started."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    url: str


def rendezvous_port(job_id: str) -> int:
    """One port per SLURM job, the same on every node of it."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def torchrun_placement() -> Placement | None:
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Placement(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]),
                     int(os.environ.get("LOCAL_WORLD_SIZE", world)), "env://")


def slurm_placement(environ=os.environ) -> Placement | None:
    """The placement of a task of a SLURM job step with several tasks, else None."""
    if "SLURM_STEP_ID" not in environ or int(environ.get("SLURM_NTASKS", "1")) < 2:
        return None
    tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_NNODES", "1"))
    host = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"])
    port = environ.get("MASTER_PORT") or rendezvous_port(environ["SLURM_JOB_ID"])
    return Placement(int(environ["SLURM_PROCID"]), tasks, int(environ["SLURM_LOCALID"]), tasks // nodes,
                     f"tcp://{host}:{port}")


def first_host(node_list: str) -> str:
    """The first host of a SLURM node list (``node[01-04]``), as ``scontrol`` expands it."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                           check=True).stdout.split()
    return hosts[0]


def launched_placement(num_processes: int = 1, num_machines: int = 1) -> Placement | None:
    """torchrun's placement, or SLURM's when the command line asks for no processes itself."""
    return torchrun_placement() or (slurm_placement() if num_processes * num_machines == 1 else None)


def planned_world_size(num_processes: int, num_machines: int) -> int:
    placement = launched_placement(num_processes, num_machines)
    return placement.world_size if placement else num_processes * num_machines


def launch(main, args: tuple, num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", after_init=None, saves_on_signal: bool = False) -> None:
    """Run ``main(*args)`` in every process of the job; ``after_init(local_world_size)`` runs in
    each process once the process group exists (Detectron2 builds its per-machine group there).
    ``saves_on_signal``: ``main`` trains and acts on SLURM's stop signals (helpers/preemption.py),
    so every process of the tool, this one included, notes them instead of ending at once; the
    tool then exits with ``preemption.RESUME_EXIT_STATUS``."""
    if saves_on_signal:
        preemption.stop_on_signals()
    placement = launched_placement(num_processes, num_machines)
    if placement:
        _init_process_group(placement.url, placement.rank, placement.world_size, placement.local_rank)
        _run(main, args, after_init, placement.local_world_size)
        return
    world_size = num_processes * num_machines
    if world_size == 1:
        main(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
        dist_url = free_local_url()
    try:
        mp.start_processes(_worker, nprocs=num_processes, start_method="spawn",
                           args=(main, args, num_processes, machine_rank, world_size, dist_url, after_init,
                                 saves_on_signal))
    except mp.ProcessExitedException as error:
        if error.exit_code != preemption.RESUME_EXIT_STATUS:
            raise
        raise SystemExit(preemption.RESUME_EXIT_STATUS) from None


def _worker(local_rank: int, main, args, num_processes: int, machine_rank: int, world_size: int,
            dist_url: str, after_init, saves_on_signal: bool) -> None:
    if saves_on_signal:
        preemption.stop_on_signals()
    _init_process_group(dist_url, machine_rank * num_processes + local_rank, world_size, local_rank)
    _run(main, args, after_init, num_processes)


def _init_process_group(url: str, rank: int, world_size: int, local_rank: int) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=30))


def _run(main, args, after_init, local_world_size: int) -> None:
    try:
        if after_init:
            after_init(local_world_size)
        main(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def configure_logging() -> None:
    """INFO from rank 0 only, warnings and errors from every process: eight processes per node
    repeating each line for days fill a job's log with copies."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def report_cpus(loader_workers: int) -> int:
    """How many CPUs this process may run on (``os.sched_getaffinity``), logged once by rank 0,
    with a warning from any process that has fewer than its data loader workers: a job step
    started without ``--cpus-per-task`` on a cluster that binds tasks to cores gets one."""
    cpus = len(os.sched_getaffinity(0))
    rank = dist.get_rank() if dist.is_initialized() else 0
    logging.getLogger(__name__).info("process %d may run on %d CPUs (os.sched_getaffinity)", rank, cpus)
    if cpus < loader_workers:
        logging.getLogger(__name__).warning(
            "process %d may run on %d CPUs, fewer than its %d data loader workers: loading will be slow. Under "
            "SLURM, start the step with srun --cpus-per-task (or export SRUN_CPUS_PER_TASK)", rank, cpus,
            loader_workers)
    return cpus


def local_device() -> torch.device:
    """This process's GPU (by ``LOCAL_RANK`` or the current device), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Element-wise sums over all processes (no-op without a process group); a tensor of
    values is read back once, whatever its length."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
