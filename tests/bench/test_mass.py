"""``ace-diffusers bench mass``: the thousand words it erases, and the report it prints (no generation)."""

import pytest

from ace_diffusers.bench.mass import format_report, unrelated_words
from ace_diffusers.shapes.heldout import heldout_words, training_words
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present


@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_the_unrelated_words_are_none_of_the_worlds_and_fixed_by_the_seed():
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    words = unrelated_words(pipe, 1000)
    assert len(set(words)) == 1000 and words == unrelated_words(pipe, 1000)
    assert words != unrelated_words(pipe, 1000, seed=1)
    drawn = {w for ws in heldout_words().values() for w in ws}
    assert not set(words) & (training_words() | drawn)
    with pytest.raises(ValueError, match="unrelated words"):
        unrelated_words(pipe, 10**7)


def _row(concept: str, acc_s: float) -> dict:
    metrics = {"acc_e": 0.0, "acc_g": 0.25, "acc_heldout": 0.0, "acc_s": acc_s, "in_context": 1.0}
    base = {"acc_e": 1.0, "acc_g": 1.0, "acc_heldout": 0.8, "acc_s": 1.0, "in_context": 1.0}
    counts = {"erased": 32, "synonyms": 48, "heldout": 64, "others": 192, "pairs": 32}
    return {"concept": concept, "method": "closed form", "counts": counts, **metrics,
            **{f"base_{k}": v for k, v in base.items()}}


def test_the_report_gives_intervals_and_names_every_failing_bar():
    result = {"words": 1000, "concepts": 1002, "sample": ["apple", "bridge"], "rank": 256,
              "fit_seconds": 12.3, "peak_extra_rss_mb": 900.0, "torch_threads": 2, "images_per_prompt": 4,
              "rows": [_row("circle", 1.0), _row("square", 0.9)]}
    text = format_report(result)
    assert "1002 concepts" in text and "fit 12.3 s, rank 256" in text
    assert "| circle | mass closed form | 0.0% (0–11) | 25.0% (15–39) |" in text
    assert "- circle: closed-form bars (Acc_s >= base - 2 pts, in context >= base - 5 pts): met" in text
    assert "- square: closed-form bars" in text and "NOT MET: acc_s 90.0% < base 100.0%" in text


def test_a_saved_run_is_rewritten_into_its_section_of_the_page(tmp_path):
    import json

    from ace_diffusers.bench.mass import SECTION, main

    result = {"words": 1000, "concepts": 1002, "sample": ["apple"], "rank": 256, "fit_seconds": 1.0,
              "peak_extra_rss_mb": 1.0, "torch_threads": 2, "images_per_prompt": 4, "seconds": 10.0,
              "command": "ace-diffusers bench mass", "rows": [_row("circle", 1.0)]}
    saved, page = tmp_path / "mass.json", tmp_path / "benchmarks.md"
    saved.write_text(json.dumps(result))
    page.write_text("# Benchmarks\n")
    assert main(["--from-json", str(saved), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.count(SECTION[0]) == 1 and "Command: `ace-diffusers bench mass` (10 s)" in text
    assert main(["--from-json", str(saved), "--docs", str(page)]) == 0 and page.read_text() == text
