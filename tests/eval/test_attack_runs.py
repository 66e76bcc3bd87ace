"""The optimised attacks inside an evaluation: the concept-vector attack draws its shifted embedding after
erasure only and its word prompt before and after, both scored as attacks and written to the report."""

from ace_diffusers.eval.concept_vector import ConceptVectorSettings
from ace_diffusers.eval.judges import CallableJudge
from ace_diffusers.eval.plans import prompt_plan
from ace_diffusers.eval.report import write_report
from ace_diffusers.eval.runner import evaluate

from .conftest import colour_judge_function


def test_concept_vector_cases_in_an_evaluation(erased_pipe, tmp_path):
    plan = prompt_plan(
        "cat", templates=["a photo of {}", "a {}"], others=["dog"], neutral="animal", images_per_prompt=2,
        attacks=["concept_vector"], soft_prompts=1, sampler=dict(num_inference_steps=2, height=16, width=16),
    )
    judges = {"concept": CallableJudge(colour_judge_function("cat", "dog"), ["cat", "dog"])}
    settings = ConceptVectorSettings(steps=2, top_k=8, candidates=4)
    evaluation = evaluate(erased_pipe, plan, judges, concept_vector=settings)
    after, before = evaluation["after"], evaluation["before"]
    assert {"concept_vector", "concept_vector_tokens"} <= set(after.attacks)
    assert after.attacks["concept_vector"]["n"] == 2 and after.attacks["concept_vector_tokens"]["n"] == 2
    assert "concept_vector" not in before.attacks and "concept_vector_tokens" in before.attacks
    (record,) = evaluation["concept_vector"]["attacks"]
    assert record["innocuous"] == "a photo of animal" and record["pairs"] == 2  # both erased prompts
    assert evaluation["concept_vector"]["settings"]["steps"] == 2
    paths = write_report(evaluation, tmp_path / "report", {"model": "tiny", "method": "random adapter"})
    assert "Concept-vector attack" in paths["markdown"].read_text() and record["found"] in paths[
        "markdown"
    ].read_text()


def test_optimised_attacks_show_a_progress_bar(erased_pipe, capsys):
    plan = prompt_plan("cat", templates=["a {}"], others=["dog"], images_per_prompt=1,
                       attacks=["concept_vector"], soft_prompts=1,
                       sampler=dict(num_inference_steps=1, height=16, width=16))
    judges = {"concept": CallableJudge(colour_judge_function("cat", "dog"), ["cat", "dog"])}
    evaluate(erased_pipe, plan, judges, before=False,
             concept_vector=ConceptVectorSettings(steps=2, top_k=4, candidates=2))
    assert "concept-vector attack" in capsys.readouterr().err
