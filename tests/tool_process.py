"""Runs a tool as ``python tools/X.py ARGS`` would, in a process forked from one that imported
torch, torchvision and the project once: a fresh interpreter spends about 4 s of a 2-core
machine importing them, which, for the hundred tool runs of the suite that check a command
line, was a quarter of ``make test``.

The forking process (this file run as a script) never runs a torch operation, so its children
start as a fresh interpreter would (OpenMP is not fork-safe once used); each child gets its
own process group, working folder, arguments, stdin from /dev/null, stdout and stderr, and
exits through the interpreter's usual end (non-daemon threads joined, atexit handlers run).
Tests that signal a tool or time it start a real ``python`` instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision", "cv2", "fvcore.common.config", "helpers.distributed", "pretrain.engine",
           "pretrain.cli", "detection.config", "study_runner.config")

_server: subprocess.Popen | None = None
_lock = threading.Lock()


def run_tool(script: str | Path, *arguments, cwd: Path = REPO, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGUMENTS`` (``SCRIPT`` relative to the repository, or absolute) with its
    output captured as text, as ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
    global _server
    path = Path(script) if Path(script).is_absolute() else REPO / script
    with _lock, tempfile.TemporaryDirectory() as folder:
        if _server is None or _server.poll() is not None:
            _server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, cwd=REPO)
        request = {"script": str(path), "arguments": [str(argument) for argument in arguments], "cwd": str(cwd),
                   "stdout": f"{folder}/stdout", "stderr": f"{folder}/stderr", "timeout": timeout, "env": env}
        _server.stdin.write(json.dumps(request) + "\n")
        _server.stdin.flush()
        reply = _server.stdout.readline()
        if not reply:
            raise RuntimeError(f"tests/tool_process.py ended (exit {_server.wait()}) while running {path.name}")
        status = json.loads(reply)["returncode"]
        output = [Path(request[stream]).read_text(errors="replace") for stream in ("stdout", "stderr")]
    if status is None:
        raise subprocess.TimeoutExpired([sys.executable, str(path), *arguments], timeout, *output)
    return subprocess.CompletedProcess([sys.executable, str(path), *map(str, arguments)], status, *output)


def _child(request: dict) -> None:
    """Become ``python SCRIPT ARGUMENTS``; never returns."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    status = 1
    try:
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for stream, fd, mode in (("/dev/null", 0, os.O_RDONLY), (request["stdout"], 1, os.O_WRONLY | os.O_CREAT),
                                 (request["stderr"], 2, os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(stream, mode, 0o644), fd)
        sys.stdin, sys.stdout = open(0, closefd=False), open(1, "w", closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # line-buffered, as Python's own
        if request["env"] is not None:
            os.environ.clear()
            os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [request["script"], *request["arguments"]]
        sys.path[0] = str(Path(request["script"]).parent)
        try:
            runpy.run_path(request["script"], run_name="__main__")
            status = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                status = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def _serve() -> None:
    """Read one request per line from stdin; fork, wait, and answer each with its exit status
    (``null`` when it ran past its timeout and was killed)."""
    import importlib
    import signal
    import time

    for module in PRELOAD:
        importlib.import_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(wait_status)
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.01)
        sys.stdout.write(json.dumps({"returncode": status}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
