from types import SimpleNamespace

import pytest

from ace_diffusers.bench.closed_form import concept_names, format_report, target_checks, timing_row


def _row(n, cold, preparation, new, warm):
    row = {
        "concepts": n,
        "rank": 32,
        "fits_per_timing": 5 if n == 1 else 1,
        "adapter_mb_fp16": 3.05,
        "preparation_seconds": preparation,
    }
    for label, seconds in (("cold", cold), ("new_process", new), ("warm", warm)):
        row[f"{label}_seconds"] = seconds
        row[f"{label}_seconds_per_concept"] = seconds / n
    return row


def test_report_checks_prepared_fits_per_concept_and_100_concepts_from_cold():
    result = {
        "model": "SD1.5-shaped",
        "machine": "test",
        "build_seconds": 1.0,
        "warmup_seconds": 2.0,
        "peak_extra_rss_mb": 100.0,
        "rows": [
            _row(1, 2.1, 1.7, 0.45, 0.55),
            _row(10, 6.0, 1.8, 3.0, 2.5),
            _row(100, 21.0, 1.9, 14.0, 15.0),
        ],
    }
    lines = format_report(result).splitlines()
    assert "1 concept, prepared, new process: ≤ 0.5 s/concept: 0.450 s/concept MET" in lines
    assert "1 concept, prepared, warm: ≤ 0.5 s/concept: 0.550 s/concept NOT MET" in lines
    assert "10 concepts, prepared, new process: ≤ 0.5 s/concept: 0.300 s/concept MET" in lines
    assert "100 concepts, cold (nothing cached): ≤ 20 s: 21.0 s NOT MET" in lines
    assert "1 concept with mined neighbours, prepared, warm: ≤ 1 s: 0.550 s MET" in lines
    assert not [line for line in lines if "mined" in line and line.startswith("10")]  # one concept only
    assert not [line for line in lines if "MET" in line and "cold" in line and "s/concept" in line]
    assert any(
        line.split()[:5] == ["1", "32", "2.10", "2.100", "1.70"] for line in lines
    )  # cold, then preparation
    assert [met for _, _, met in target_checks(result["rows"][2])] == [True, True, False]


def test_timing_row_takes_medians_per_concept_and_ranges_of_repeated_fits():
    adapter = SimpleNamespace(rank=8, num_parameters=lambda: 2**20)
    seconds = {
        "cold": [3.0, 1.0, 2.0],
        "preparation": [0.5, 0.7, 0.6],
        "new_process": [0.4, 0.2, 0.3],
        "warm": [0.1, 0.3, 0.2],
    }
    row = timing_row(2, 3, seconds, adapter)
    assert row == {
        "concepts": 2,
        "rank": 8,
        "fits_per_timing": 3,
        "cold_seconds": 2.0,
        "cold_seconds_per_concept": 1.0,
        "cold_seconds_range": [1.0, 3.0],
        "preparation_seconds": 0.6,
        "preparation_seconds_range": [0.5, 0.7],  # paid once, not per concept
        "new_process_seconds": 0.3,
        "new_process_seconds_per_concept": 0.15,
        "new_process_seconds_range": [0.2, 0.4],
        "warm_seconds": 0.2,
        "warm_seconds_per_concept": 0.1,
        "warm_seconds_range": [0.1, 0.3],
        "adapter_mb_fp16": 2.0,
    }
    single = timing_row(1, 1, {k: v[:1] for k, v in seconds.items()}, adapter)
    assert not [k for k in single if k.endswith("_range")] and single["cold_seconds"] == 3.0


def test_concept_names_are_distinct_and_bounded():
    names = concept_names(1000)
    assert len(set(names)) == 1000 and names[:2] == ["Anna Varga", "Boris Varga"]
    assert concept_names(3) == names[:3] and names[100] == "Anna A. Varga"  # the first 100 as they were
    with pytest.raises(ValueError, match="at most 2000"):
        concept_names(2001)


def test_a_thousand_concepts_are_checked_against_the_mass_erasure_targets():
    checks = {
        target: (measured, met)
        for target, measured, met in target_checks(_row(1000, 58.0, 9.0, 150.0, 190.0))
    }
    assert checks["1000 concepts, cold (nothing cached): ≤ 60 s"] == ("58.0 s", True)
    assert checks["1000 concepts, prepared, new process: ≤ 0.2 s/concept"] == ("0.150 s/concept", True)
    assert checks["1000 concepts, prepared, warm: ≤ 0.2 s/concept"] == ("0.190 s/concept", True)
    assert not target_checks(_row(1000, 61.0, 9.0, 150.0, 210.0))[-1][2]
