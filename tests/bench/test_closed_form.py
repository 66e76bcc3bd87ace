from ace_diffusers.bench.closed_form import format_report, target_checks


def _row(n, cold, preparation, new, warm):
    row = {"concepts": n, "rank": 32, "fits_per_timing": 5 if n == 1 else 1, "adapter_mb_fp16": 3.05,
           "preparation_seconds": preparation}
    for label, seconds in (("cold", cold), ("new_process", new), ("warm", warm)):
        row[f"{label}_seconds"] = seconds
        row[f"{label}_seconds_per_concept"] = seconds / n
    return row


def test_report_checks_prepared_fits_per_concept_and_100_concepts_from_cold():
    result = {"model": "SD1.5-shaped", "machine": "test", "build_seconds": 1.0, "warmup_seconds": 2.0,
              "peak_extra_rss_mb": 100.0,
              "rows": [_row(1, 2.1, 1.7, 0.45, 0.55), _row(10, 6.0, 1.8, 3.0, 2.5), _row(100, 21.0, 1.9, 14.0, 15.0)]}
    lines = format_report(result).splitlines()
    assert "1 concept, prepared, new process: ≤ 0.5 s/concept: 0.450 s/concept MET" in lines
    assert "1 concept, prepared, warm: ≤ 0.5 s/concept: 0.550 s/concept NOT MET" in lines
    assert "10 concepts, prepared, new process: ≤ 0.5 s/concept: 0.300 s/concept MET" in lines
    assert "100 concepts, cold (nothing cached): ≤ 20 s: 21.0 s NOT MET" in lines
    assert not [line for line in lines if "MET" in line and "cold" in line and "s/concept" in line]
    assert any(line.split()[:5] == ["1", "32", "2.10", "2.100", "1.70"] for line in lines)  # cold, then preparation
    assert [met for _, _, met in target_checks(result["rows"][2])] == [True, True, False]
