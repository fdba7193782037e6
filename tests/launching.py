"""`accelerate launch` of two real CPU processes for the tests: a port the OS says is free, and on a hang the whole
process tree killed and the output shown (a timed-out `subprocess.run` kills only the launcher and leaves its workers
running, holding their port, the CPU and the output pipes, for the tests after it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil  # a dependency of accelerate

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for the launcher's rendezvous store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(
    config: str | os.PathLike, script_and_args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG --main_process_port <free> --num_cpu_threads_per_process 1 ...`.

    Args:
        config: the accelerate config file.
        script_and_args: the script (and any shim before it), then its arguments.
        env: the environment of the launcher and its workers.
        timeout: seconds; past it the launcher and every worker are killed and the test fails with their output.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1",
               *script_and_args]  # fmt: skip
    # A session of its own: the launcher and its workers form one process group that can be killed together.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torch's elastic agent starts each worker in a session of its own: killing the launcher's process group
        # leaves them running (holding the pipes, so that reading the output to its end would wait for them).
        with contextlib.suppress(psutil.NoSuchProcess):
            for worker in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
        os.killpg(process.pid, signal.SIGKILL)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a process outside the launcher's tree still holds the pipes
            stdout, stderr = "", "(the output could not be read: a process outside the launcher's tree holds it)"
        raise AssertionError(
            f"`accelerate launch` still ran after {timeout} s (killed):\nstdout:\n{stdout[-3000:]}\n"
            f"stderr:\n{stderr[-6000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
