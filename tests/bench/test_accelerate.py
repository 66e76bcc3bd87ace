"""``ace-diffusers bench`` under ``accelerate launch`` with two CPU processes: the efficacy images are
split across the processes, the page is written once, and every figure equals the one-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

# A very small efficacy run: one shape, two colours, a few steps of everything.
TINY = [
    "--sections",
    "efficacy",
    "--shapes",
    "square",
    "--multi",
    "--colours",
    "red",
    "blue",
    "--images-per-prompt",
    "1",
    "--ace-steps",
    "2",
    "--esd-steps",
    "2",
    "--esd-trajectories",
    "1",
    "--esd-prompts",
    "1",
    "--soft-steps",
    "2",
    "--inference-steps",
    "5",
]
LAUNCH = "from ace_diffusers.cli import main; import sys; sys.exit(main(['bench', *sys.argv[1:]]))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _figures(result: dict) -> list:
    """Everything measured about erasure (not the seconds, which differ between runs)."""
    return [
        (e["label"], m, entry["metrics"], entry["attacks"])
        for e in result["sections"]["efficacy"]["erasures"]
        for m, entry in sorted(e["methods"].items())
    ]


@pytest.mark.slow
@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_bench_under_accelerate_matches_one_process(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = tmp_path / "launch_bench.py"
    script.write_text(LAUNCH)
    single = subprocess.run(
        [sys.executable, str(script), *TINY, "--output", str(tmp_path / "one" / "benchmarks.md")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stderr[-3000:]
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
        str(script),
        *TINY,
        "--output",
        str(tmp_path / "two" / "benchmarks.md"),
    ]
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "benchmarks.json").read_text())
    two = json.loads((tmp_path / "two" / "benchmarks.json").read_text())
    assert one["sections"]["efficacy"]["processes"] == 1 and two["sections"]["efficacy"]["processes"] == 2
    assert _figures(two) == _figures(one)
    assert launched.stdout.count("[bench] wrote") == 1  # the main process alone writes and reports
