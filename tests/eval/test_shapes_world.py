"""The evaluation suite on the real miniature world (skipped until its weights are bundled)."""

import pytest

from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}"),
]


def test_closed_form_erasure_is_measured_before_and_after():
    from ace_diffusers.eval.attacks import SoftPromptSettings
    from ace_diffusers.eval.judges import ShapesJudge
    from ace_diffusers.eval.runner import evaluate, shapes_plan
    from ace_diffusers.fitting.erase import erase_concept
    from ace_diffusers.shapes.classifier import load_shapes_classifier
    from ace_diffusers.shapes.erasure import erase_arguments
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    classifier = load_shapes_classifier()
    erase_concept(pipe, **erase_arguments("circle"))
    plan = shapes_plan(
        "circle",
        images_per_prompt=1,
        colours=["red", "blue", "green", "yellow"],
        attacks=["misspelling", "soft_prompt"],
        soft_prompts=1,
    )
    judges = {h: ShapesJudge(classifier, h) for h in ("shape", "colour")}
    result = evaluate(pipe, plan, judges, soft_prompt=SoftPromptSettings(steps=10))
    before, after = result["before"].metrics, result["after"].metrics
    assert before["acc_e"] >= 0.5  # the original model draws circles
    assert after["acc_e"] <= before["acc_e"]
    assert set(result["after"].attacks) == {"misspelling", "soft_prompt"}
