"""``ace-diffusers eval`` machinery under ``accelerate launch`` with two CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .accelerate_script import run

SCRIPT = Path(__file__).with_name("accelerate_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--multi_gpu` selects accelerate's torchrun launcher; on a CPU-only machine the processes form a gloo
    # group (plain `--cpu --num_processes 2` needs mpirun for more than one process).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    launched = json.loads(out.read_text())
    assert launched["processes"] == 2
    single = json.loads(json.dumps(run(None)))
    assert single["processes"] == 1
    for which in ("after", "before"):
        assert launched[which] == single[which]
