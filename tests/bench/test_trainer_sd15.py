"""``bench trainer --shape sd15``: the phase report (formatting only; the SD1.5-shaped fit is a benchmark,
not a test)."""

from ace_diffusers.bench.trainer_sd15 import format_report


def test_report_names_every_phase_the_per_step_cost_and_the_fixed_part():
    result = {"model": "SD1.5-shaped", "torch_threads": 2, "concept": "x", "steps": 10, "seconds": 90.0,
              "phase_seconds": {"query capture": 20.0, "mining": 15.0, "closed form": 5.0,
                                "training set": 25.0, "adversaries": 5.0, "steps": 20.0}}
    lines = format_report(result).splitlines()
    assert "10 steps, 90.0 s in all" in lines[0]
    assert "mining             15.0 s" in lines and "per step           2.00 s" in lines
    assert lines[-1] == "fixed part (before the first step) ≤ 60 s: 65.0 s NOT MET"
    result["phase_seconds"]["training set"] = 5.0
    assert format_report(result).endswith("45.0 s MET")
