import json

import pytest
import torch
from PIL import Image

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.attacks import SoftPromptSettings
from ace_diffusers.eval.common import ace_disabled
from ace_diffusers.eval.judges import CallableJudge, shapes_judges
from ace_diffusers.eval.plans import EvalCase, prompt_plan, shapes_plan
from ace_diffusers.eval.report import write_report
from ace_diffusers.eval.runner import evaluate, make_batches, score
from ace_diffusers.shapes.erasure import measure, metric_sets
from ace_diffusers.testing import random_adapter

from .conftest import cat_plan, colour_judge_function

TINY = dict(num_inference_steps=2, height=16, width=32)
COLOURS = ["red", "blue"]


def _shape_judges(classifier):
    return shapes_judges(classifier)


def test_shapes_plan_reproduces_measure_exactly(sd_pipe, random_classifier):
    """Same prompts, seeds, batches and sampler as shapes.erasure.measure: identical numbers."""
    sets = metric_sets("circle", colours=COLOURS)
    expected, _ = measure(sd_pipe, random_classifier, "circle", images_per_prompt=2, sets=sets, **TINY)
    plan = shapes_plan("circle", images_per_prompt=2, attacks=[], sampler=TINY, colours=COLOURS)
    result = evaluate(sd_pipe, plan, _shape_judges(random_classifier), before=False)
    assert result["after"].metrics == expected
    assert list(result["after"].metrics) == [
        "acc_e", "acc_g", "acc_s", "colour", "acc_heldout", "in_context", "in_context_colour",
        "in_context_style", "h", "erased_as_none", "erased_as_other",
    ]


def test_evaluate_before_and_after_with_attacks_and_report(sd_pipe, tmp_path):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, gate_bias=6.0, magnitude=2.0), "erase")
    plan = prompt_plan(
        "cat",
        templates=["a photo of {}", "a {}"],
        synonyms=["kitten"],
        others=["dog"],
        neutral="animal",
        images_per_prompt=1,
        attacks=["misspelling", "negative", "soft_prompt"],
        soft_prompts=1,
        sampler=dict(num_inference_steps=2, height=16, width=16),
    )
    judges = {"concept": CallableJudge(colour_judge_function("cat", "dog"), ["cat", "dog"])}
    settings = SoftPromptSettings(steps=2, objective="attention")
    evaluation = evaluate(sd_pipe, plan, judges, soft_prompt=settings)
    after, before = evaluation["after"], evaluation["before"]
    assert set(after.metrics) == {"acc_e", "acc_g", "acc_s", "h"}
    assert (
        set(after.attacks) == {"misspelling", "negative", "soft_prompt"}
        and after.attacks["soft_prompt"]["n"] == 1
    )
    assert "soft_prompt" not in before.attacks
    assert after.images["erased"].dtype == torch.uint8 and after.images["erased"].shape == (2, 3, 16, 16)
    # the adapter is switched back on after the "before" pass, and "before" is the plain model
    assert sd_pipe.get_active_ace_adapters() == ["erase"]
    with ace_disabled(sd_pipe):
        plain = evaluate(sd_pipe, plan, judges, before=False, soft_prompt=settings)
    assert (
        plain["after"].predictions["concept"][: len(before.predictions["concept"])]
        == before.predictions["concept"]
    )

    paths = write_report(evaluation, tmp_path / "report", {"model": "tiny", "method": "random adapter"})
    results = json.loads(paths["json"].read_text())
    assert results["metrics"]["after"] == pytest.approx(after.metrics, abs=1e-4)
    assert results["attacks"]["negative"]["asr_before"] == pytest.approx(
        before.attacks["negative"]["asr"], abs=1e-4
    )
    assert len(results["images"]) == len(evaluation["cases"])
    assert results["images"][0]["predicted_before"]["concept"] in ("cat", "dog")
    text = paths["markdown"].read_text()
    assert "| Acc_e" in text and "| soft_prompt |" in text and "grid.png" in text
    for key in ("grid", "metrics_plot", "attacks_plot"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 100
    assert not list((tmp_path / "report").glob(".*tmp*"))  # atomic writes leave nothing behind


def test_evaluate_needs_a_judge_for_the_plan_head(sd_pipe):
    plan = prompt_plan("cat", others=["dog"], attacks=[])
    with pytest.raises(ACEValueError):
        evaluate(sd_pipe, plan, {"style": CallableJudge(lambda x: ["a"] * len(x), ["a"])})


def test_make_batches_split_groups_and_input_kinds():
    plan = cat_plan()
    batches = make_batches(plan.cases, 3)
    assert [len(b) for b in batches] == [3, 1, 3, 1, 3, 3, 2, 3, 1]
    assert all(len({plan.cases[i].group for i in b}) == 1 for b in batches)
    assert [i for b in batches for i in b] == list(range(len(plan.cases)))
    soft = [EvalCase("g", None, 0, {}, embeds="k"), EvalCase("g", "p", 0, {})]
    assert make_batches(soft, 8) == [[0], [1]]


def test_score_computes_the_metrics_and_attack_rates():
    plan = prompt_plan(
        "cat",
        templates=["{}"],
        synonyms=["kitten"],
        others=["dog"],
        images_per_prompt=2,
        attacks=["misspelling"],
    )
    assert len(plan.cases) == 8
    # erased: both images still show a cat; synonyms: one of two; others: both right; attacks: one of two
    predicted = {
        "erased": ["cat", "cat"],
        "synonyms": ["cat", "dog"],
        "others": ["dog", "dog"],
        "attack/misspelling": ["dog", "cat"],
    }
    labels = [predicted[c.group][k % 2] for k, c in enumerate(plan.cases)]
    metrics, groups, attacks = score(plan, plan.cases, {"concept": labels})
    assert metrics == {"acc_e": 1.0, "acc_g": 0.5, "acc_s": 1.0, "h": 0.0}
    assert groups["synonyms"]["n"] == 2 and groups["synonyms"]["accuracy"] == {"concept": 0.5}
    assert attacks == {
        "misspelling": {"asr": 0.5, "n": 2, "interval": groups["attack/misspelling"]["interval"]}
    }


def test_score_reports_where_the_erased_concept_goes_and_in_context_preservation():
    plan = shapes_plan("circle", images_per_prompt=1, attacks=[], colours=COLOURS)
    n = len(plan.cases)
    shape = ["square"] * n
    erased = [i for i, c in enumerate(plan.cases) if c.group == "erased"]
    shape[erased[0]] = "none"  # one erased image shows nothing, the other a square
    preds = {"shape": shape, "colour": ["red"] * n}
    preds.update({k: [c.labels.get(k, "x") for c in plan.cases] for k in ("right_shape", "right_colour")})
    preds["right_style"] = ["solid"] * n
    metrics, groups, _ = score(plan, plan.cases, preds)
    assert metrics["erased_as_none"] == 0.5 and metrics["erased_as_other"] == 0.5 and metrics["acc_e"] == 0
    assert metrics["in_context"] == 1.0 and metrics["in_context_colour"] == 1.0
    assert 0 < metrics["in_context_style"] < 1 and groups["pairs"]["interval"][1] == 1.0
