"""Intra-op threads per process: the pure resolution, the launcher-default detection, the flag, and the
real `accelerate launch` (which writes OMP_NUM_THREADS=1 into its children)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mineralnet.config import load_config
from mineralnet.errors import MineralNetError
from mineralnet.threads import (LAUNCHER_MARKS, available_cores, launcher_left_default, local_process_count,
                                parse_threads, resolve_threads)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("setting, env_omp, default, cores, local, current, want", [
    (3, None, False, 16, 1, 16, 3),      # --threads wins over everything
    (3, "1", True, 16, 2, 1, 3),
    (3, "8", False, 16, 2, 8, 3),
    (None, "1", True, 16, 1, 1, 16),     # the launcher's default of one, one process: every core
    (None, "1", True, 16, 2, 1, 8),      # two local processes share the cores
    (None, "1", True, 16, 3, 1, 5),      # floor
    (None, "1", True, 2, 4, 1, 1),       # more processes than cores: still one each
    (None, "1", False, 16, 1, 1, 1),     # the user's own OMP_NUM_THREADS=1
    (None, "6", False, 16, 2, 6, 6),     # the user's OMP_NUM_THREADS
    (None, None, False, 16, 1, 12, 12),  # nothing set, no launcher: torch's default stays
    (None, "abc", False, 16, 1, 12, 12),  # unusable OMP_NUM_THREADS: torch's default stays
])
def test_resolve_threads_cases(setting, env_omp, default, cores, local, current, want):
    n, why = resolve_threads(setting, env_omp, default, cores, local, current)
    assert n == want
    assert why  # always says why
    if setting is not None:
        assert why == "--threads"
    elif default:
        assert f"{cores} cores / {local} process" in why


def test_resolve_threads_never_oversubscribes_and_leaves_less_than_a_process_idle():
    for cores in range(1, 70):
        for local in range(1, 9):
            n, _ = resolve_threads(None, "1", True, cores, local, 1)
            if cores >= local:  # every process gets its share, together no more than the cores
                assert n * local <= cores < (n + 1) * local
            else:
                assert n == 1


@pytest.mark.parametrize("env, parent_env, parent_cmd, want", [
    (LAUNCHED, {}, ["accelerate", "launch", "train.py"], True),
    (LAUNCHED, None, None, True),  # parent unreadable: take it as the launcher's default
    (LAUNCHED, {"OMP_NUM_THREADS": "1"}, ["accelerate", "launch", "train.py"], False),  # the user set it
    (LAUNCHED, {}, ["accelerate", "launch", "--num_cpu_threads_per_process", "1", "t.py"], False),
    (LAUNCHED, {}, ["accelerate", "launch", "--num_cpu_threads_per_process=1", "t.py"], False),
    ({"TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1"}, {}, ["torchrun", "t.py"], True),
    ({"OMP_NUM_THREADS": "1"}, {}, ["bash"], False),  # no launcher: the user's
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "4"}, {}, ["accelerate"], False),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, {}, ["accelerate"], False),
])
def test_launcher_default_is_told_apart_from_the_users_choice(env, parent_env, parent_cmd, want):
    assert launcher_left_default(env, parent_env, parent_cmd) is want


def test_local_processes_and_cores():
    assert local_process_count({}) == 1
    assert local_process_count({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_process_count({"LOCAL_WORLD_SIZE": "x"}) == 1
    assert available_cores() == len(os.sched_getaffinity(0))


def test_threads_flag_and_config_field():
    assert parse_threads("auto") is None and parse_threads(None) is None and parse_threads("3") == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(MineralNetError, match="--threads"):
            parse_threads(bad)
    assert load_config("base", threads="auto").threads is None
    assert load_config("base", threads="4").threads == 4
    assert load_config("base").threads is None
    with pytest.raises(MineralNetError, match="--threads 0 must be at least 1"):
        load_config("base", threads=0)


PROBE = ("import sys; sys.path.insert(0, {root!r}); import torch; from mineralnet.threads import apply_threads; "
         "n, why = apply_threads(None); print('THREADS', n, torch.get_num_threads(), why)")


def _launch(tmp_path, env_extra, launcher_args=()):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and k not in LAUNCHER_MARKS}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *launcher_args, str(script)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(l for l in p.stdout.splitlines() if l.startswith("THREADS"))
    _, n, torch_n, *_ = line.split()
    assert n == torch_n
    return int(n)


@pytest.mark.slow
@pytest.mark.skipif(available_cores() < 2, reason="needs 2 or more cores to tell one thread from all")
def test_real_accelerate_launch_default_gets_every_core_and_a_users_choice_stays(tmp_path):
    cores = available_cores()
    assert _launch(tmp_path, {}) == cores                       # launcher wrote OMP_NUM_THREADS=1 itself
    assert _launch(tmp_path, {"OMP_NUM_THREADS": "1"}) == 1    # the user asked for one
    assert _launch(tmp_path, {}, ["--num_cpu_threads_per_process", "1"]) == 1
