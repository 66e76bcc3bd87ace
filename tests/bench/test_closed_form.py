from ace_diffusers.bench.closed_form import format_report, one_time_seconds


def _row(n, cold, new, warm):
    row = {"concepts": n, "rank": 32, "fits_per_timing": 5 if n == 1 else 1, "adapter_mb_fp16": 3.05}
    for label, seconds in (("cold", cold), ("new_process", new), ("warm", warm)):
        row[f"{label}_seconds"] = seconds
        row[f"{label}_seconds_per_concept"] = seconds / n
    return row


def test_report_checks_every_column_and_prints_the_one_time_preset_encoding():
    result = {"model": "SD1.5-shaped", "machine": "test", "build_seconds": 1.0, "warmup_seconds": 2.0,
              "peak_extra_rss_mb": 100.0,
              "rows": [_row(1, 2.1, 0.45, 0.55), _row(10, 4.0, 3.0, 2.5), _row(100, 21.0, 14.0, 15.0)]}
    assert one_time_seconds(result["rows"][0]) == 2.1 - 0.55
    lines = format_report(result).splitlines()
    assert any(line.startswith("1 concept: 2.10 s cold = one fit + the one-time encoding") and "(about 1.55 s" in line
               for line in lines)
    assert "1 concepts: 2.100 s/concept cold (target <= 0.5) NOT MET" in lines  # still checked
    assert "1 concepts: 0.450 s/concept new process (target <= 0.5) MET" in lines
    assert "1 concepts: 0.550 s/concept warm (target <= 0.5) NOT MET" in lines
    assert "10 concepts: 0.400 s/concept cold (target <= 0.5) MET" in lines
    assert "100 concepts: 21.0 s cold (target <= 20.0) NOT MET" in lines
