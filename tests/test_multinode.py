"""Two machines on loopback: `accelerate launch --num_machines 2` as two concurrent launchers (one process
each, gloo on CPU) trains exactly what one process trains, and only the main process writes the run."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mineralnet import data as mdata
from mineralnet.runs import read_split
from test_train import TINY, TRAIN, _max_diff, _run, _weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_command(rank: int, port: int, args: list[str]) -> list[str]:
    """The README's two-machine command, for machine `rank` of 2 with one CPU process each, on loopback."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            TRAIN, *args]


@pytest.mark.slow
def test_two_machines_on_loopback_equal_one_process(tmp_path):
    data = str(mdata.make_demo_dataset(tmp_path / "photos", classes=3, per_class=14, size=40, seed=1))
    common = ["--data", data, "--epochs", "2", *TINY, "--freeze-bn", "--loss", "wtopk", "--k", "0.25",
              "--alpha", "0.1"]
    _run([*common, "--out", str(tmp_path / "one")], tmp_path)
    port, procs = _free_port(), []
    for rank in (0, 1):
        machine = tmp_path / f"machine{rank}"  # its own working folder and cache, as on its own disk
        machine.mkdir()
        env = dict(os.environ, MINERALNET_CACHE=str(machine / "cache"), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        cmd = machine_command(rank, port, [*common, "--out", str(tmp_path / "two")])
        procs.append(subprocess.Popen(cmd, cwd=machine, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(1.0)  # the main machine opens the rendezvous port first
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    (out0, _), (out1, _) = outs
    assert "2 process(es) on cpu" in out0 and "epoch   2/2" in out0
    assert "epoch" not in out1  # one console report, from the main machine
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5
    # the second machine wrote nothing of the run outside the shared run folder
    assert sorted(p.name for p in (tmp_path / "machine1").iterdir()) == []
    n_val = len(read_split(tmp_path / "two")["splits"]["val"])
    m = json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())
    assert sum(map(sum, m["confusion"])) == n_val
    assert [json.loads(l)["epoch"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
