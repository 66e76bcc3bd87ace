"""The efficacy benchmark: summaries of the judged images, and a tiny end-to-end run on the miniature
world."""

import pytest
import torch

from ace_diffusers.bench import efficacy, efficacy_plans
from ace_diffusers.bench.suite import efficacy_plan
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present


def test_summaries_average_metrics_and_pool_attack_images():
    per = {
        "a": {
            "metrics": {"acc_e": 0.0, "h": 1.0},
            "attacks": {"misspelling": {"asr": 0.5, "n": 4, "hits": 2}},
        },
        "b": {
            "metrics": {"acc_e": 0.5, "h": 0.5},
            "attacks": {"misspelling": {"asr": 0.0, "n": 12, "hits": 0}},
        },
    }
    summary = efficacy.summarize(per)
    assert summary["metrics"] == {"acc_e": 0.25, "h": 0.75}
    assert summary["attacks"]["misspelling"] == {"hits": 2, "n": 16, "asr": 0.125}


@pytest.mark.slow
@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_tiny_efficacy_run_on_the_miniature_world():
    """Every method fitted, attacked and scored; the undo leaves the pipeline's weights as they were."""
    plan = efficacy_plan(
        True,
        {
            "shapes": ["circle"],
            "multi": [],
            "colours": ["red", "blue"],
            "ace_steps": 2,
            "esd_steps": 2,
            "esd_trajectories": 1,
            "esd_prompts": 1,
            "soft_steps": 2,
            "inference_steps": 5,
        },
    )
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


def test_pool_attacks_without_images_has_no_rate():
    pooled = efficacy.pool_attacks([{"negative": {"hits": 0, "n": 0}}, {"negative": {"hits": 0, "n": 0}}])
    assert pooled == {"negative": {"hits": 0, "n": 0, "asr": None}}
    assert efficacy.pool_attacks([]) == {}


def test_the_plans_are_importable_from_here_as_before():
    for name in (
        "QUICK",
        "FULL",
        "MULTI_CONCEPTS",
        "METHODS",
        "ATTACK_NAMES",
        "ERASERS",
        "EfficacyPlan",
        "experiments",
        "plan_images",
        "erasure_arguments",
        "case_key",
    ):
        assert getattr(efficacy, name) is getattr(efficacy_plans, name)
