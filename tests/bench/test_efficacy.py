"""The efficacy benchmark's plan (what --quick measures) and a tiny end-to-end run on the miniature world."""

import re

import pytest
import torch

from ace_diffusers.bench import efficacy
from ace_diffusers.bench.suite import efficacy_plan
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present
from ace_diffusers.shapes.vocab import SHAPES, STYLES


def test_quick_plan_contents():
    quick, full = efficacy.QUICK, efficacy.FULL
    assert quick.shapes == ["square", "circle"] and len(full.shapes) >= 4
    for plan in (quick, full):
        assert sorted(plan.multi) == [1, 3, 5] and all(len(c) == n for n, c in plan.multi.items())
    assert "striped" in quick.multi[5]  # a fill style among the five
    # the quick plan is the full one made cheaper on every knob
    for knob in ("images_per_prompt", "esd_steps", "esd_trajectories", "esd_prompts", "soft_prompts", "soft_steps"):
        assert getattr(quick, knob) <= getattr(full, knob), knob
    assert quick.ace_steps is full.ace_steps is None  # both measure ACE at the trainer's defaults
    assert len(quick.colours) == 4 and full.colours is None
    # images per model state, pinned: changing the quick plan changes its ~15-minute budget
    assert efficacy.plan_images(quick) == {"square": 39, "circle": 40, "square+triangle+heart": 85,
                                           "square+triangle+heart+cross+striped": 141, "base": 190}


def test_experiments_reuse_the_single_run_for_one_concept():
    erasures, sizes = efficacy.experiments(efficacy.QUICK)
    assert [e.label for e in erasures] == ["square", "circle", "square+triangle+heart",
                                           "square+triangle+heart+cross+striped"]
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
    from ace_diffusers.shapes.erasure import erase_arguments

    args = efficacy.erasure_arguments(["square"])
    standard = erase_arguments("square")
    assert args["concepts"] == ["square"] and args["neutral"] == [standard["neutral"]]
    assert args["preserve"] == standard["preserve"] and args["templates"] == standard["templates"]
    with pytest.raises(ValueError):
        efficacy.erasure_arguments(["circle", "circle"])


def test_plan_overrides_from_the_command_line():
    plan = efficacy_plan(True, {"shapes": ["star"], "multi": [3], "inference_steps": 5, "ace_steps": None})
    assert plan.shapes == ["star"] and plan.multi == {3: efficacy.MULTI_CONCEPTS[3]}
    assert plan.sampler == {"num_inference_steps": 5} and plan.ace_steps == efficacy.QUICK.ace_steps
    assert efficacy_plan(False, {"multi": []}).multi == {}
    with pytest.raises(ValueError):
        efficacy_plan(True, {"multi": [4]})


def test_summaries_average_metrics_and_pool_attack_images():
    per = {"a": {"metrics": {"acc_e": 0.0, "h": 1.0}, "attacks": {"misspelling": {"asr": 0.5, "n": 4, "hits": 2}}},
           "b": {"metrics": {"acc_e": 0.5, "h": 0.5}, "attacks": {"misspelling": {"asr": 0.0, "n": 12, "hits": 0}}}}
    summary = efficacy.summarize(per)
    assert summary["metrics"] == {"acc_e": 0.25, "h": 0.75}
    assert summary["attacks"]["misspelling"] == {"hits": 2, "n": 16, "asr": 0.125}


@pytest.mark.slow
@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_tiny_efficacy_run_on_the_miniature_world():
    """Every method fitted, attacked and scored; the undo leaves the pipeline's weights as they were."""
    plan = efficacy_plan(True, {"shapes": ["circle"], "multi": [], "colours": ["red", "blue"], "ace_steps": 2,
                                "esd_steps": 2, "esd_trajectories": 1, "esd_prompts": 1, "soft_steps": 2,
                                "inference_steps": 5})
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    logged: list[str] = []
    result = efficacy.run(plan, log=logged.append, pipe=pipe)
    after = pipe.unet.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], v) for k, v in weights.items())
    assert pipe.get_active_ace_adapters() == []
    (erasure,) = result["erasures"]
    assert erasure["label"] == "circle" and set(erasure["methods"]) == set(efficacy.METHODS)
    base = erasure["methods"]["base"]
    assert base["seconds"] is None and "soft_prompt" not in base["attacks"]
    assert base["metrics"]["acc_e"] >= 0.5  # the unedited world draws circles, even at 5 denoising steps
    for method in efficacy.ERASERS:
        entry = erasure["methods"][method]
        assert entry["seconds"] > 0
        assert set(entry["attacks"]) == set(efficacy.ATTACK_NAMES)
        assert all(0 <= a["asr"] <= 1 and a["n"] > 0 for a in entry["attacks"].values())
        assert set(entry["metrics"]) >= {"acc_e", "acc_s", "acc_g", "h"}
    assert result["images"]["circle"] == result["images"]["base"] + 1  # + the soft-prompt image
    assert any("ESD-x fitted" in line for line in logged)
