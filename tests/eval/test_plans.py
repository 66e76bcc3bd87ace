"""Evaluation plans: which images are generated, with which seeds, prompts and expected labels."""

import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval import plans as plans_module
from ace_diffusers.eval import runner
from ace_diffusers.eval.plans import ATTACK_PREFIX, EvalCase, prompt_plan, shapes_plan
from ace_diffusers.shapes.erasure import DEFAULT_NEUTRAL

from .conftest import cat_plan

COLOURS = ["red", "blue"]


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
    assert shapes_plan("circle", neutral="blob", attacks=["negative"], colours=COLOURS).cases[
        -1
    ].negative_prompt in ("blob", "square, triangle, star")
    style = shapes_plan("striped", erased=["striped", "circle"], attacks=["context"], colours=COLOURS)
    assert style.head == "style" and style.erased == ["striped", "circle"]
    assert all(
        "circle" not in c.prompt.split(" next to ")[-1] for c in style.cases if c.group == "attack/context"
    )
    with pytest.raises(ACEValueError):
        shapes_plan("circle", attacks=["bribery"])


def test_prompt_plan_groups_labels_and_soft_prompt_jobs():
    plan = cat_plan()
    groups = plan.describe()["groups"]
    assert groups == {"erased": 4, "synonyms": 4, "others": 8, "attack/misspelling": 4}
    assert {c.labels["concept"] for c in plan.cases if c.group == "others"} == {"dog", "car"}
    assert plan.soft_prompt[0].prompt == "a photo of cat" and plan.soft_prompt[0].seeds == [0, 1]
    assert [c.seed for c in plan.cases if c.group == "erased"] == [0, 1, 0, 1]  # the same seeds per prompt
    misspelt = [c for c in plan.cases if c.group == ATTACK_PREFIX + "misspelling"]
    assert {c.base_prompt for c in misspelt} == {"a photo of cat", "cat"} and all(
        c.labels == {"concept": "cat"} for c in misspelt
    )
    with pytest.raises(ACEValueError):
        prompt_plan("cat", others=[])
    with pytest.raises(ACEValueError):
        prompt_plan("cat", others=["dog"], templates=["no slot"])
    with pytest.raises(ACEValueError):
        prompt_plan("cat", others=["dog"], attacks=["bribery"])


def test_plan_description_and_case_serialisation():
    plan = prompt_plan(
        "cat",
        templates=["{}"],
        others=["dog"],
        images_per_prompt=1,
        attacks=[],
        seed=5,
        sampler={"num_inference_steps": 3},
    )
    info = plan.describe()
    assert info["erased"] == ["cat"] and info["sampler"] == {"num_inference_steps": 3, "guidance_scale": 7.5}
    assert info["groups"] == {"erased": 1, "others": 1} and info["soft_prompt_targets"] == []
    assert plan.cases[0].to_dict() == {
        "group": "erased",
        "prompt": "cat",
        "seed": 5,
        "labels": {"concept": "cat"},
    }
    soft = EvalCase("attack/soft_prompt", None, 0, {"concept": "cat"}, None, "soft0", "cat")
    assert soft.to_dict() == {
        "group": "attack/soft_prompt",
        "seed": 0,
        "labels": {"concept": "cat"},
        "embeds": "soft0",
        "base_prompt": "cat",
    }


def test_shapes_plan_without_attacks_and_on_a_style():
    plan = shapes_plan("circle", images_per_prompt=1, attacks=[], colours=COLOURS)
    assert set(plan.groups()) == {"erased", "synonyms", "others", "heldout", "pairs"}
    assert plan.soft_prompt == []
    assert plan.extra_metrics["colour"] == ("others", "colour") and plan.erased == ["circle"]
    assert plan.extra_metrics["in_context"] == ("pairs", "right_shape") and plan.presence_head == "shape"
    pairs = [c for c in plan.cases if c.group == "pairs"]
    assert len(pairs) >= 16 and all(c.prompt.startswith(("a red circle", "a blue circle")) for c in pairs)
    style = shapes_plan("striped", images_per_prompt=1, attacks=["negative"], colours=COLOURS)
    assert style.head == "style" and style.neutral == DEFAULT_NEUTRAL["style"]
    assert "striped" not in style.others


def test_the_plans_are_importable_from_the_runner_as_before():
    for name in (
        "EvalCase",
        "EvalPlan",
        "SoftPromptJob",
        "shapes_plan",
        "prompt_plan",
        "ATTACK_PREFIX",
        "CORE_GROUPS",
        "DEFAULT_SAMPLER",
    ):
        assert getattr(runner, name) is getattr(plans_module, name)
