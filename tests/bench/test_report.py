"""Benchmark report: targets computed from the numbers, Markdown tables, plots and atomic files (no
generation)."""

import json

from PIL import Image

from ace_diffusers.bench import plots, report, results
from ace_diffusers.bench.efficacy_plans import ATTACK_NAMES

from .conftest import fake_result


def _by_target(result: dict) -> dict[str, dict]:
    return {t["target"]: t for t in report.targets(result)}


def test_targets_are_computed_from_the_numbers():
    rows = _by_target(fake_result())
    single = rows["ACE full: H ≥ 0.90 (mean over single-concept erasures)"]
    assert single["met"] is True and single["measured"].startswith("0.950")
    assert rows["ACE full: H ≥ 0.90 (mean over multi-concept adapters (3, 5 concepts))"]["met"] is True
    for name in ATTACK_NAMES.values():  # 1 hit in 8 images = 12.5 % <= 20 %
        asr = rows[f"ACE full: ASR ≤ 20 % — {name}"]
        assert asr["met"] is True and asr["measured"] == "12.5 % (5/40 images)"  # 8 + 8 + 24 images
    assert rows["ACE full H above UCE (mean over all erasures)"]["met"] is True
    assert "higher on 3/3 erasures" in rows["ACE full H above ESD-x (mean over all erasures)"]["measured"]
    assert rows["inference overhead ≤ 1.03× (1 concept)"]["met"] is True
    assert rows["inference overhead ≤ 1.10× (100 concepts)"]["met"] is False  # 1.12
    # per concept: prepared fits (the per-kind preparation is paid once); 100 concepts: cold, everything
    # included
    cf = "closed form at SD1.5 shape: "
    assert rows[cf + "1 concept, prepared, new process: ≤ 0.5 s/concept"]["met"] is True  # 0.45
    assert rows[cf + "1 concept, prepared, warm: ≤ 0.5 s/concept"]["met"] is False  # 0.55
    assert rows[cf + "10 concepts, prepared, warm: ≤ 0.5 s/concept"]["met"] is True  # 0.5
    assert rows[cf + "100 concepts, prepared, new process: ≤ 0.5 s/concept"]["met"] is True
    assert cf + "10 concepts, prepared, new process: ≤ 0.5 s/concept" not in rows  # an older JSON: no column
    assert not [t for t in rows if t.startswith(cf) and "cold" in t and "s/concept" in t]
    assert rows[cf + "100 concepts, cold (nothing cached): ≤ 20 s"]["met"] is False  # 21 s
    speed = rows["ACE full fit ≥ 10× faster than ESD-x at equal or better Acc_e"]
    assert speed["met"] is True and "16.00×" in speed["measured"]  # 240 s / 15 s, Acc_e 5 % <= 10 %


def test_targets_flip_with_the_numbers():
    result = fake_result()
    for e in result["sections"]["efficacy"]["erasures"]:
        full = e["methods"]["ace_full"]
        full["metrics"] = {**full["metrics"], "h": 0.5, "acc_e": 0.5}  # worse than UCE and ESD-x
        full["attacks"]["negative"] = {"asr": 0.5, "n": 8, "hits": 4}
        full["seconds"] = 40.0
    rows = _by_target(result)
    assert rows["ACE full: H ≥ 0.90 (mean over single-concept erasures)"]["met"] is False
    assert rows["ACE full H above UCE (mean over all erasures)"]["met"] is False
    assert rows["ACE full: ASR ≤ 20 % — negative-prompt trick"]["met"] is False
    assert rows["ACE full: ASR ≤ 20 % — misspelling"]["met"] is True
    speed = rows["ACE full fit ≥ 10× faster than ESD-x at equal or better Acc_e"]
    assert speed["met"] is False and "2.00×" in speed["measured"]


def test_missing_sections_are_not_measured_and_not_rendered():
    result = fake_result()
    del result["sections"]["efficacy"], result["sections"]["inference"]
    rows = report.targets(result)
    unmeasured = [t["target"] for t in rows if t["met"] is None]
    # only the closed-form rows remain measurable: 2 prepared columns for 1 and 100 concepts, 1 for 10,
    # 100 cold, and the 2 prepared columns of 1 concept against the mined-fit bar
    assert len(unmeasured) == len(rows) - 8
    text = report.markdown(result)
    assert "## 2. Speed" in text and "## 1. Efficacy" not in text and "## 3. Inference" not in text
    assert text.count("| not measured |") == len(unmeasured)
    assert set(report.plots(result)) == set()


def test_markdown_has_every_section_table_and_plot_link():
    text = report.markdown(fake_result())
    for heading in (
        "## Targets",
        "## 1. Efficacy",
        "### Each shape erased alone",
        "### Multi-concept adapters",
        "### Attack success rate per attack",
        "## 2. Speed",
        "## 3. Inference overhead",
        "## 4. Adapter size",
    ):
        assert heading in text
    assert "| circle | base model | 98.0 % | 97.0 % | 10.0 % | 0.050 | – |" in text
    assert "| 3: circle, square, triangle | base model |" in text and "| 1: circle | base model |" in text
    assert "| ACE full | 12.5 % (5/40) |" in text  # pooled over 8 + 8 + 24 attack images per attack
    assert "| fused | 1.0000 | 1.000× |" in text
    assert "| 1 | 32 | 2.10 | 2.100 | 1.70 | 0.45 | 0.450 | 0.55 | 0.550 | 3.05 |" in text
    assert "| 10 | 104 | 7.00 | 0.700 | – | – | – | 5.00 | 0.500 | 9.85 |" in text  # an older JSON: no column
    assert "(ranges: new process 0.4–0.5 s, warm 0.5–0.6 s)" in text  # cold is timed once
    assert "| 3 concepts | 1.00 | 5.00 | 0.50 | 80 | 16.00× | 5.0 % | 10.0 % |" in text
    for name in report.PLOTS.values():
        assert f"(images/{name})" in text
    assert "**not met**" in text and "**met**" in text


def test_write_plots_json_and_markdown_atomically(tmp_path):
    result = fake_result()
    paths = report.write(result, tmp_path / "docs" / "benchmarks.md")
    assert json.loads(paths["json"].read_text()) == result
    text = paths["markdown"].read_text()
    for name in report.PLOTS.values():
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width >= 500
        assert (tmp_path / "docs" / "images" / name).exists() and f"(images/{name})" in text
    assert "[benchmarks.json](benchmarks.json)" in text
    assert not [p for p in (tmp_path / "docs").rglob("*") if ".tmp" in p.name]


def test_the_suite_page_keeps_the_sections_other_commands_write(tmp_path):
    from ace_diffusers.bench import mass, trainer_report
    from ace_diffusers.bench.deploy import write_section

    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nold suite text\n", encoding="utf-8")
    write_section(page, "trainer figures", markers=trainer_report.SECTION, heading=trainer_report.HEADING)
    write_section(page, "mass figures", markers=mass.SECTION, heading=mass.HEADING)
    text = report.write(fake_result(), page)["markdown"].read_text(encoding="utf-8")
    assert "old suite text" not in text and "## 1. Efficacy" in text
    for (start, end), heading, body in ((trainer_report.SECTION, trainer_report.HEADING, "trainer figures"),
                                        (mass.SECTION, mass.HEADING, "mass figures")):
        assert text.count(start) == text.count(end) == 1 and f"## {heading}" in text and body in text


def test_names_that_moved_are_still_importable_from_here():
    assert report.pooled_asr is results.pooled_asr and report.TARGET_H == results.TARGET_H
    assert report.plots is plots.plots and report.PLOTS is plots.PLOTS and report.plot_h is plots.plot_h
