"""Intra-op CPU threads per process: `--threads` (TrainConfig.threads), default auto.

`accelerate launch` writes OMP_NUM_THREADS=1 into every process it starts unless it is given
`--num_cpu_threads_per_process N` (or `--cpu` with OMP_NUM_THREADS unset, when it picks physical cores per
process itself): accelerate/commands/launch.py sets `num_cpu_threads_per_process =
get_int_from_env(["OMP_NUM_THREADS"], 1)` and accelerate/utils/launch.py copies it into the children's
OMP_NUM_THREADS. torchrun does the same when it starts more than one process per machine. So the plain
`accelerate launch launch/train.py --config cpu` trains on one core.

A process cannot tell that launcher default from a user's own OMP_NUM_THREADS=1 by its environment alone
(both read "1"). It can read its launcher's: the launcher is the parent process (accelerate runs torchrun's
agent in-process, and both start the training processes as children), and /proc/<parent>/environ holds the
environment the launcher itself was started with. The decision:
- OMP_NUM_THREADS=1 in a launched process counts as the launcher's default when the launcher's own
  environment had no OMP_NUM_THREADS and its command line no `--num_cpu_threads_per_process`; when the
  parent cannot be read, it counts as the default too (say `--threads 1` to insist on one thread);
- then each process gets cores // local processes threads (cores = the CPUs this process may run on,
  os.sched_getaffinity);
- `--threads N`, or an OMP_NUM_THREADS the user set (any value), is used as given;
- otherwise (no launcher, no OMP_NUM_THREADS) torch's own default stays.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from mineralnet.errors import MineralNetError

# environment variables only a launcher sets: Accelerate's, and torchrun's
LAUNCHER_MARKS = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID")
THREADS_FLAG = "--num_cpu_threads_per_process"


def resolve_threads(setting: Optional[int], env_omp: Optional[str], launcher_default: bool, cores: int,
                    local_processes: int, current: int) -> tuple[int, str]:
    """Intra-op threads for one training process -> (threads, why).

    Args:
        setting: `--threads` (None = auto).
        env_omp: this process's OMP_NUM_THREADS (None when unset).
        launcher_default: OMP_NUM_THREADS=1 was put there by the launcher, not by the user.
        cores: CPUs this process may run on.
        local_processes: training processes on this machine.
        current: torch's thread count now (kept when nothing asks for another).
    """
    if setting is not None:
        return int(setting), "--threads"
    if env_omp is not None and launcher_default:
        local = max(1, local_processes)
        n = max(1, cores // local)
        return n, f"auto: {cores} cores / {local} process(es) on this machine"
    if env_omp is not None:
        try:
            n = int(env_omp)
        except ValueError:
            n = 0
        if n >= 1:
            return n, "OMP_NUM_THREADS"
        return current, f"torch default (OMP_NUM_THREADS={env_omp!r} is not a positive integer)"
    return current, "torch default"


def launcher_left_default(env: Mapping[str, str], parent_env: Optional[Mapping[str, str]],
                          parent_cmdline: Optional[list[str]]) -> bool:
    """True when OMP_NUM_THREADS=1 in `env` is the launcher's default rather than the user's choice.

    Args:
        env: this process's environment.
        parent_env: the launcher's own start-up environment (None when it cannot be read).
        parent_cmdline: the launcher's command line (None when it cannot be read).
    """
    if env.get("OMP_NUM_THREADS", "").strip() != "1" or not any(k in env for k in LAUNCHER_MARKS):
        return False
    if parent_env is not None and "OMP_NUM_THREADS" in parent_env:
        return False  # the user set it for the launcher, which passed it on
    if parent_cmdline is not None and any(a == THREADS_FLAG or a.startswith(THREADS_FLAG + "=")
                                          for a in parent_cmdline):
        return False
    return True


def _read_nul_list(path: str) -> Optional[list[str]]:
    try:
        with open(path, "rb") as f:
            return [s.decode(errors="replace") for s in f.read().split(b"\0") if s]
    except OSError:
        return None


def parent_launch_info(ppid: Optional[int] = None) -> tuple[Optional[dict], Optional[list[str]]]:
    """(start-up environment, command line) of the parent process, from /proc; (None, None) elsewhere."""
    ppid = os.getppid() if ppid is None else ppid
    env_items = _read_nul_list(f"/proc/{ppid}/environ")
    env = dict(s.split("=", 1) for s in env_items if "=" in s) if env_items is not None else None
    return env, _read_nul_list(f"/proc/{ppid}/cmdline")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def local_process_count(env: Mapping[str, str]) -> int:
    """Training processes on this machine, as the launcher says (torchrun: LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def apply_threads(setting: Optional[int]) -> tuple[int, str]:
    """Resolve the thread count for this process and set it (torch.set_num_threads) -> (threads, why)."""
    import torch

    env = os.environ
    default = False
    if env.get("OMP_NUM_THREADS", "").strip() == "1" and any(k in env for k in LAUNCHER_MARKS):
        default = launcher_left_default(env, *parent_launch_info())
    n, why = resolve_threads(setting, env.get("OMP_NUM_THREADS"), default, available_cores(),
                             local_process_count(env), torch.get_num_threads())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n, why


def parse_threads(value) -> Optional[int]:
    """A `--threads` value: "auto"/None -> None, else a positive int (one clear error otherwise)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise MineralNetError(f"--threads {value!r} must be a positive number of threads or auto")
    return n
