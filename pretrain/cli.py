"""Bad input at the command line ends in one line, ``error: ...``, and exit status 2, before any
process is launched or any file written; tracebacks are kept for real bugs."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

USAGE_EXIT_STATUS = 2


class UsageError(ValueError):
    """A config key or value, a path or an option the user gave cannot work; the message names it
    and what is allowed."""


def reports_usage_errors(main):
    """Wrap a tool's entry point: a ``UsageError`` becomes ``error: ...`` on stderr and exit 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(USAGE_EXIT_STATUS) from None
    return wrapper


def merge_config(cfg, config_file: str | Path, opts: list[str]):
    """``cfg`` merged with ``config_file`` and then the ``KEY VALUE`` overrides; yacs's reports
    of an unknown key or a wrong type (KeyError, ValueError, AssertionError) become usage errors
    that name where the key came from."""
    path = Path(config_file)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    if len(opts) % 2:
        raise UsageError(f"config overrides come in KEY VALUE pairs, got {list(opts)}")
    for source, merge in ((str(path), lambda: cfg.merge_from_file(str(path))),
                          ("the command line", lambda: cfg.merge_from_list(list(opts)))):
        try:
            merge()
        except (KeyError, ValueError, TypeError, AssertionError) as error:
            raise UsageError(f"{source}: {str(error).strip(chr(39))}") from None
    return cfg


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{key} is {value!r}; choose one of {', '.join(map(str, choices))}")


def check_file(key: str, path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{key}: {path} does not exist")
    return path


def check_launch(num_gpus: int, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "auto") -> None:
    """The process layout of ``--num-gpus``, ``--num-machines``, ``--machine-rank`` and
    ``--dist-url``, checked before any process is started."""
    if num_gpus < 1:
        raise UsageError(f"--num-gpus is {num_gpus}; give 1 or more (processes per machine)")
    if torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        raise UsageError(f"--num-gpus is {num_gpus}, but this machine has {torch.cuda.device_count()} GPUs")
    if num_machines < 1:
        raise UsageError(f"--num-machines is {num_machines}; give 1 or more")
    if not 0 <= machine_rank < num_machines:
        raise UsageError(f"--machine-rank is {machine_rank}; give 0 to {num_machines - 1} for {num_machines} machines")
    if num_machines > 1 and dist_url == "auto":
        raise UsageError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
