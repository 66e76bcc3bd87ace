"""Writing an evaluation: the JSON summary, the Markdown page, the image grid and the plots (no
generation)."""

import io
import json

import pytest
import torch
from PIL import Image

from ace_diffusers.eval.plans import EvalCase, prompt_plan
from ace_diffusers.eval.report import build_results, grid_rows, image_grid, markdown, write_report
from ace_diffusers.eval.runner import EvalResult


def _images(n, value):
    return torch.full((n, 3, 8, 8), value, dtype=torch.uint8)


def fake_evaluation(before=True):
    """What ``evaluate`` returns for a small plan with one soft-prompt image (only judged after)."""
    plan = prompt_plan(
        "cat",
        templates=["{}"],
        synonyms=["kitten"],
        others=["dog"],
        neutral="animal",
        images_per_prompt=1,
        attacks=["misspelling", "soft_prompt"],
        soft_prompts=1,
    )
    cases = list(plan.cases) + [
        EvalCase("attack/soft_prompt", None, 0, {"concept": "cat"}, None, "soft0", "cat")
    ]
    after = EvalResult(
        metrics={"acc_e": 0.0, "acc_g": 1 / 3, "acc_s": 1.0, "h": 0.857142857},
        groups={c.group: {"n": 1, "accuracy": {"concept": 0.0}, "interval": [0.0, 0.79]} for c in cases},
        attacks={
            "misspelling": {"asr": 0.0, "n": 1, "interval": [0.0, 0.79]},
            "soft_prompt": {"asr": 1.0, "n": 1, "interval": [0.21, 1.0]},
        },
        predictions={"concept": ["dog", "dog", "dog", "dog", "cat"]},
        images={
            "erased": _images(1, 10),
            "attack/misspelling": _images(1, 20),
            "attack/soft_prompt": _images(1, 30),
            "others": _images(1, 40),
        },
        seconds=2.0,
    )
    previous = EvalResult(
        metrics={"acc_e": 1.0, "acc_g": 1.0, "acc_s": 1.0, "h": 0.0},
        groups={c.group: {"n": 1, "accuracy": {"concept": 1.0}, "interval": [0.21, 1.0]} for c in cases[:-1]},
        attacks={"misspelling": {"asr": 1.0, "n": 1, "interval": [0.21, 1.0]}},
        predictions={"concept": ["cat", "cat", "dog", "cat"]},
        images={"erased": _images(1, 50)},
    )
    soft = {
        "settings": {"steps": 2, "objective": "attention", "target": "teacher", "init": "concept"},
        "attacks": [{"prompt": "cat", "initial_loss": 0.5, "final_loss": 0.125, "seconds": 0.1, "steps": 2}],
    }
    return {
        "plan": plan,
        "cases": cases,
        "after": after,
        "before": previous if before else None,
        "soft_prompt": soft,
        "seconds": 3.25,
    }


def test_results_pair_every_image_with_its_labels_before_and_after():
    results = build_results(fake_evaluation(), {"model": "tiny", "method": "random"})
    assert results["model"] == "tiny" and results["plan"]["concept"] == "cat"
    assert results["metrics"]["after"]["h"] == 0.8571  # rounded to 4 digits
    assert results["attacks"] == {
        "misspelling": {"n": 1, "asr_after": 0.0, "interval_after": [0.0, 0.79], "asr_before": 1.0},
        "soft_prompt": {
            "n": 1,
            "asr_after": 1.0,
            "interval_after": [0.21, 1.0],
        },  # no "before": optimised after
    }
    images = results["images"]
    assert len(images) == 5 and [i["predicted_after"]["concept"] for i in images] == ["dog"] * 4 + ["cat"]
    assert [i["predicted_before"]["concept"] for i in images[:4]] == ["cat", "cat", "dog", "cat"]
    assert "predicted_before" not in images[4] and images[4]["embeds"] == "soft0"
    assert set(results["environment"]) == {"python", "torch"}
    json.dumps(results)  # JSON-ready


def test_results_without_the_original_model_pass():
    results = build_results(fake_evaluation(before=False))
    assert results["metrics"]["before"] is None and results["groups"]["before"] is None
    assert "asr_before" not in results["attacks"]["misspelling"]
    assert all("predicted_before" not in i for i in results["images"])


def test_markdown_tables():
    results = build_results(fake_evaluation(), {"model": "tiny"})
    text = markdown(results, {"results.json": "all numbers"})
    lines = text.splitlines()
    assert lines[0] == "# Erasure evaluation: cat" and "- **model**: tiny" in lines
    assert "| Acc_e (erased concept still shown, lower is better) | 1.000 | 0.000 |" in lines
    assert "| misspelling | 1 | 1.000 | 0.000 | [0.00, 0.79] |" in lines
    assert "| soft_prompt | 1 | – | 1.000 | [0.21, 1.00] |" in lines
    assert any("init from `concept` tokens; loss per attacked prompt 0.5 → 0.125." in line for line in lines)
    assert "| attack/soft_prompt | 1 | – | 0.000 |" in lines
    assert "- `results.json`: all numbers" in lines and "Evaluation took 3.2 s." in lines


def test_grid_rows_and_image():
    rows = grid_rows(fake_evaluation())
    assert [label for label, _ in rows] == [
        "erased - before",
        "erased - after",
        "others - after",
        "attack/misspelling - after",
        "attack/soft_prompt - after",
    ]
    png = image_grid(rows, tile=16, label_width=40)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (40 + 18, 5 * 18)
        assert image.getpixel((40, 0)) == (50, 50, 50)  # the first row: the "before" image
    with Image.open(io.BytesIO(image_grid([]))) as empty:
        assert empty.size[1] > 0


def test_write_report_writes_every_file(tmp_path):
    paths = write_report(fake_evaluation(), tmp_path / "report", {"model": "tiny"})
    assert set(paths) == {"json", "grid", "metrics_plot", "attacks_plot", "markdown"}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "attacks.png",
        "grid.png",
        "metrics.png",
        "report.md",
        "results.json",
    ]
    assert json.loads(paths["json"].read_text())["metrics"]["after"]["acc_s"] == 1.0
    assert "`attacks.png`" in paths["markdown"].read_text()


def test_write_report_without_attacks_has_no_attack_plot(tmp_path):
    evaluation = fake_evaluation()
    evaluation["after"].attacks = {}
    evaluation["before"].attacks = {}
    paths = write_report(evaluation, tmp_path)
    assert "attacks_plot" not in paths and not (tmp_path / "attacks.png").exists()
    assert "## Attacks" not in paths["markdown"].read_text()


@pytest.mark.parametrize("before", [True, False])
def test_plots_are_pngs(tmp_path, before):
    paths = write_report(fake_evaluation(before), tmp_path)
    for key in ("metrics_plot", "attacks_plot"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 100
