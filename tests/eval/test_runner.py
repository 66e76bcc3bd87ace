import json

import pytest
import torch
from PIL import Image

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.attacks import SoftPromptSettings
from ace_diffusers.eval.common import ace_disabled
from ace_diffusers.eval.judges import CallableJudge, ShapesJudge
from ace_diffusers.eval.report import write_report
from ace_diffusers.eval.runner import EvalCase, evaluate, make_batches, prompt_plan, shapes_plan
from ace_diffusers.shapes.erasure import DEFAULT_NEUTRAL, measure, metric_sets
from ace_diffusers.testing import random_adapter

from .conftest import colour_judge_function

TINY = dict(num_inference_steps=2, height=16, width=16)
COLOURS = ["red", "blue"]


def _shape_judges(classifier):
    return {"shape": ShapesJudge(classifier, "shape"), "colour": ShapesJudge(classifier, "colour")}


def test_shapes_plan_reproduces_measure_exactly(sd_pipe, random_classifier):
    """Same prompts, seeds, batches and sampler as shapes.erasure.measure: identical numbers."""
    sets = metric_sets("circle", colours=COLOURS)
    expected, _ = measure(sd_pipe, random_classifier, "circle", images_per_prompt=2, sets=sets, **TINY)
    plan = shapes_plan("circle", images_per_prompt=2, attacks=[], sampler=TINY, colours=COLOURS)
    result = evaluate(sd_pipe, plan, _shape_judges(random_classifier), before=False)
    assert result["after"].metrics == expected
    assert list(result["after"].metrics) == ["acc_e", "acc_g", "acc_s", "colour", "h"]


def test_shapes_plan_structure():
    plan = shapes_plan("circle", images_per_prompt=2, colours=COLOURS)
    groups = plan.describe()["groups"]
    assert groups["erased"] == 4 and groups["attack/misspelling"] == 4 and groups["attack/negative"] == 4
    assert plan.head == "shape" and plan.neutral == DEFAULT_NEUTRAL["shape"]
    assert "disc" in plan.synonyms and "circle" not in plan.others
    assert len(plan.soft_prompt) == 2 and plan.soft_prompt[0].labels["shape"] == "circle"
    neg = [c for c in plan.cases if c.group == "attack/negative"]
    # negative prompts: the neutral anchor (when it is a word) and the other concepts
    expected = {"square, triangle, star"} | ({plan.neutral} if plan.neutral else set())
    assert {c.negative_prompt for c in neg} == expected
    assert shapes_plan("circle", neutral="blob", attacks=["negative"], colours=COLOURS).cases[-1].negative_prompt in (
        "blob", "square, triangle, star")
    style = shapes_plan("striped", erased=["striped", "circle"], attacks=["context"], colours=COLOURS)
    assert style.head == "style" and style.erased == ["striped", "circle"]
    assert all("circle" not in c.prompt.split(" next to ")[-1] for c in style.cases if c.group == "attack/context")
    with pytest.raises(ACEValueError):
        shapes_plan("circle", attacks=["bribery"])


def test_prompt_plan_and_batches():
    plan = prompt_plan("cat", templates=["a photo of {}", "{}"], synonyms=["kitten"], others=["dog", "car"],
                       neutral="animal", images_per_prompt=2, attacks=["misspelling", "soft_prompt"], soft_prompts=1)
    groups = plan.describe()["groups"]
    assert groups == {"erased": 4, "synonyms": 4, "others": 8, "attack/misspelling": 4}
    assert {c.labels["concept"] for c in plan.cases if c.group == "others"} == {"dog", "car"}
    assert plan.soft_prompt[0].prompt == "a photo of cat" and plan.soft_prompt[0].seeds == [0, 1]
    batches = make_batches(plan.cases, 3)
    assert [len(b) for b in batches] == [3, 1, 3, 1, 3, 3, 2, 3, 1]
    assert all(len({plan.cases[i].group for i in b}) == 1 for b in batches)
    soft = [EvalCase("g", None, 0, {}, embeds="k"), EvalCase("g", "p", 0, {})]
    assert make_batches(soft, 8) == [[0], [1]]
    with pytest.raises(ACEValueError):
        prompt_plan("cat", others=[])
    with pytest.raises(ACEValueError):
        prompt_plan("cat", others=["dog"], templates=["no slot"])


def test_evaluate_before_and_after_with_attacks_and_report(sd_pipe, tmp_path):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, gate_bias=6.0, magnitude=2.0), "erase")
    plan = prompt_plan("cat", templates=["a photo of {}", "a {}"], synonyms=["kitten"], others=["dog"],
                       neutral="animal", images_per_prompt=1, attacks=["misspelling", "negative", "soft_prompt"],
                       soft_prompts=1, sampler=dict(num_inference_steps=2, height=16, width=16))
    judges = {"concept": CallableJudge(colour_judge_function("cat", "dog"), ["cat", "dog"])}
    settings = SoftPromptSettings(steps=2, objective="attention")
    evaluation = evaluate(sd_pipe, plan, judges, soft_prompt=settings)
    after, before = evaluation["after"], evaluation["before"]
    assert set(after.metrics) == {"acc_e", "acc_g", "acc_s", "h"}
    assert set(after.attacks) == {"misspelling", "negative", "soft_prompt"} and after.attacks["soft_prompt"]["n"] == 1
    assert "soft_prompt" not in before.attacks
    assert after.images["erased"].dtype == torch.uint8 and after.images["erased"].shape == (2, 3, 16, 16)
    # the adapter is switched back on after the "before" pass, and "before" is the plain model
    assert sd_pipe.get_active_ace_adapters() == ["erase"]
    with ace_disabled(sd_pipe):
        plain = evaluate(sd_pipe, plan, judges, before=False, soft_prompt=settings)
    assert plain["after"].predictions["concept"][: len(before.predictions["concept"])] == before.predictions["concept"]

    paths = write_report(evaluation, tmp_path / "report", {"model": "tiny", "method": "random adapter"})
    results = json.loads(paths["json"].read_text())
    assert results["metrics"]["after"] == pytest.approx(after.metrics, abs=1e-4)
    assert results["attacks"]["negative"]["asr_before"] == pytest.approx(before.attacks["negative"]["asr"], abs=1e-4)
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


def test_ace_disabled_restores_the_previous_state(sd_pipe):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), "a")
    sd_pipe.disable_ace_adapters()
    with ace_disabled(sd_pipe):
        assert sd_pipe.get_active_ace_adapters() == []
    assert sd_pipe.get_active_ace_adapters() == []  # it was off before: stays off
    sd_pipe.enable_ace_adapters()
    with ace_disabled(sd_pipe):
        assert sd_pipe.get_active_ace_adapters() == []
    assert sd_pipe.get_active_ace_adapters() == ["a"]
