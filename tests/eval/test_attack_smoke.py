"""CI smoke of the whole attack suite on the real miniature world (issue: an erased concept stays erased).

Small on purpose (4 colours, 1 image per prompt, 8 denoising steps, a 5-step soft prompt: ~10 s on
2 cores); the full-size figures per attack are in docs/benchmarks.md (``ace-diffusers bench``).
"""

import pytest

from ace_diffusers.eval import ALL_ATTACKS, PROMPT_ATTACKS
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

pytestmark = pytest.mark.skipif(
    not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}"
)


def test_every_attack_runs_against_an_erased_shape():
    from ace_diffusers.eval.attacks import SoftPromptSettings
    from ace_diffusers.eval.concept_vector import ConceptVectorSettings
    from ace_diffusers.eval.discrete_tokens import DiscreteTokenSettings
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
        soft_prompts=1,
        sampler={"num_inference_steps": 8},
    )
    judges = {head: ShapesJudge(classifier, head) for head in ("shape", "colour")}
    reference = SoftPromptSettings(steps=5, reference_images=2, timesteps_per_image=2)
    discrete = DiscreteTokenSettings(steps=3, candidates=4, top_k=8, reference=reference)
    vector = ConceptVectorSettings(steps=3, candidates=4, top_k=8)
    result = evaluate(pipe, plan, judges, soft_prompt=reference, discrete_tokens=discrete,
                      concept_vector=vector)
    after, before = result["after"].attacks, result["before"].attacks
    # soft prompts and shifted embeddings target the erased model; text prompts are drawn by both
    words = {"discrete_tokens", "concept_vector_tokens"}
    assert set(after) == set(ALL_ATTACKS) | words and set(before) == set(PROMPT_ATTACKS) | words
    assert all(after[a]["n"] == 4 for a in PROMPT_ATTACKS) and after["soft_prompt"]["n"] == 1
    assert after["discrete_tokens"]["n"] == 1 and after["concept_vector"]["n"] == 1
    # the attacks are live: without the erasure, weighting syntax and the negative-prompt trick draw the
    # concept
    assert before["weighting"]["asr"] >= 0.75 and before["negative"]["asr"] >= 0.75
    # the erasure does not make prompt attacks easier (pooled over the four prompt attacks)
    hits = {
        name: sum(round(r[a]["asr"] * r[a]["n"]) for a in PROMPT_ATTACKS)
        for name, r in (("after", after), ("before", before))
    }
    assert hits["after"] < hits["before"]
    (soft,) = result["soft_prompt"]["attacks"]
    assert soft["steps"] == 5 and soft["final_loss"] < soft["initial_loss"]  # the soft prompt was optimised
    (found,) = result["discrete_tokens"]["attacks"]
    assert found["steps"] == 3 and found["final_loss"] <= found["initial_loss"] and found["exact"]
