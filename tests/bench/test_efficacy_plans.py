"""What the efficacy benchmark measures: the quick and full plans, each erasure's fit data, the images per
model state (no model is loaded)."""

import re
from types import SimpleNamespace

import pytest

from ace_diffusers.bench import efficacy_plans as efficacy
from ace_diffusers.shapes.erasure import erase_arguments
from ace_diffusers.shapes.vocab import SHAPES, STYLES


def test_quick_plan_contents():
    quick, full = efficacy.QUICK, efficacy.FULL
    assert quick.shapes == ["square", "circle"] and len(full.shapes) >= 4
    for plan in (quick, full):
        assert sorted(plan.multi) == [1, 3, 5] and all(len(c) == n for n, c in plan.multi.items())
    assert "striped" in quick.multi[5]  # a fill style among the five
    # the quick plan is the full one made cheaper on every knob
    for knob in (
        "images_per_prompt",
        "esd_steps",
        "esd_trajectories",
        "esd_prompts",
        "soft_prompts",
        "soft_steps",
    ):
        assert getattr(quick, knob) <= getattr(full, knob), knob
    assert quick.ace_steps is full.ace_steps is None  # both measure ACE at the trainer's defaults
    assert len(quick.colours) == 4 and full.colours is None
    # images per model state, pinned: changing the quick plan changes its budget (world v2 adds the
    # two-object and held-out-word prompts)
    assert efficacy.plan_images(quick) == {
        "square": 63,
        "circle": 64,
        "square+triangle+heart": 155,
        "square+triangle+heart+cross+striped": 191,
        "base": 324,
    }


def test_experiments_reuse_the_single_run_for_one_concept():
    erasures, sizes = efficacy.experiments(efficacy.QUICK)
    assert [e.label for e in erasures] == [
        "square",
        "circle",
        "square+triangle+heart",
        "square+triangle+heart+cross+striped",
    ]
    assert sizes == {"1": "square", "3": "square+triangle+heart", "5": "square+triangle+heart+cross+striped"}
    five = erasures[-1]
    assert set(five.plans) == set(five.concepts)
    assert all(sorted(p.erased) == sorted(five.concepts) for p in five.plans.values())
    assert five.plans["striped"].head == "style" and five.plans["square"].head == "shape"
    assert all(p.soft_prompt for p in five.plans.values())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w-]+", text))


@pytest.mark.parametrize("size", [3, 5])
def test_multi_concept_preservation_prompts_never_mention_an_erased_concept(size):
    concepts = efficacy.MULTI_CONCEPTS[size]
    args = efficacy.erasure_arguments(concepts)
    assert args["concepts"] == concepts and len(args["neutral"]) == size
    assert sorted(args["preserve"]) == sorted(c for c in SHAPES + STYLES if c not in concepts)
    for phrase in args["preserve"] + concepts:
        assert args["templates"][phrase], phrase
        for template in args["templates"][phrase]:
            assert not _words(template.replace("{}", "")) & set(concepts), (phrase, template)


def test_single_concept_arguments_are_the_worlds_standard_ones():
    args = efficacy.erasure_arguments(["square"])
    standard = erase_arguments("square")
    assert args["concepts"] == ["square"] and args["neutral"] == [standard["neutral"]]
    assert args["preserve"] == standard["preserve"] and args["templates"] == standard["templates"]
    with pytest.raises(ValueError):
        efficacy.erasure_arguments(["circle", "circle"])


def test_templates_and_labels():
    args = efficacy.erasure_arguments(["square", "striped"])
    assert efficacy.templates_of(args, "square") == args["templates"]["square"]
    assert efficacy.templates_of({"templates": ["a {}"]}, "square") == ["a {}"]
    assert efficacy.label_of(["square", "striped"]) == "square+striped"


def test_case_key_identifies_the_image():
    case = SimpleNamespace(prompt="a red circle", negative_prompt=None, seed=3, embeds=None, group="erased")
    other_group = SimpleNamespace(**{**vars(case), "group": "others", "negative_prompt": ""})
    assert efficacy.case_key(case) == efficacy.case_key(other_group) == ("a red circle", "", 3, None)
    assert efficacy.case_key(SimpleNamespace(**{**vars(case), "seed": 4})) != efficacy.case_key(case)


def test_plan_sizes_must_match_their_concepts():
    plan = efficacy.EfficacyPlan(
        shapes=[],
        multi={2: ["square"]},
        colours=["red"],
        images_per_prompt=1,
        ace_steps=1,
        esd_steps=1,
        esd_trajectories=1,
        esd_prompts=1,
        soft_prompts=1,
        soft_steps=1,
    )
    with pytest.raises(ValueError, match="size 2 lists 1"):
        efficacy.experiments(plan)
    assert efficacy.QUICK.to_dict()["multi"] == {str(n): c for n, c in efficacy.MULTI_CONCEPTS.items()}
