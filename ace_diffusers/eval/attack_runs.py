"""The optimised attacks of an evaluation, run on the erased model before its images are drawn: each
turns the plan's attack jobs into cases (text prompts, or prompt embeddings under a key) and a record of
what was found."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .common import distributed_map
from .concept_vector import ConceptVectorSettings, concept_vector_attack
from .discrete_tokens import DiscreteTokenSettings, discrete_token_attack
from .plans import ATTACK_PREFIX, EvalCase, EvalPlan
from .soft_prompt import SoftPromptSettings, build_soft_prompt_reference, soft_prompt_attack


def _with_bar(attack: Callable[..., Any], what: str, steps: int, state: Any) -> Callable[..., Any]:
    """``attack`` run under a progress bar of its ``steps`` (shown on the main process only)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        hidden = state is not None and not state.is_main_process
        with tqdm(total=steps, desc=what, leave=False, disable=hidden) as bar:
            return attack(*args, progress=lambda step: bar.update(step - bar.n), **kwargs)

    return run


def _references(
    pipe: Any, plan: EvalPlan, jobs: list[Any], settings: SoftPromptSettings, context: Callable[[], Any],
    state: Any,
) -> list[Any]:
    """What the original model (inside ``context()``) does on each job's prompt: the attacks' targets."""
    with context():
        return distributed_map(
            lambda job: build_soft_prompt_reference(pipe, job.prompt, settings, sampler=plan.sampler),
            jobs, state,
        )


def soft_prompt_cases(
    pipe: Any, plan: EvalPlan, settings: SoftPromptSettings, context: Callable[[], Any], state: Any
) -> tuple[list[EvalCase], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the plan's soft-prompt attacks (references on the original model, inside ``context()``):
    ``(their cases, {key: prompt embeddings}, per-attack losses and seconds)``."""
    jobs = plan.soft_prompt
    references = _references(pipe, plan, jobs, settings, context, state)
    results = distributed_map(
        lambda pair: _with_bar(soft_prompt_attack, "soft-prompt attack", settings.steps, state)(
            pipe, pair[0].prompt, plan.concept, neutral=plan.neutral, reference=pair[1], settings=settings,
            sampler=plan.sampler),
        list(zip(jobs, references, strict=True)), state,
    )
    cases, embeds = _embedding_cases("soft_prompt", jobs, results)
    soft_info = [{"prompt": job.prompt, **_record(res)} for job, res in zip(jobs, results, strict=True)]
    return cases, embeds, soft_info


def discrete_token_cases(
    pipe: Any, plan: EvalPlan, settings: DiscreteTokenSettings, context: Callable[[], Any], state: Any
) -> tuple[list[EvalCase], list[dict[str, Any]]]:
    """Run the plan's discrete-token attacks (references on the original model, inside ``context()``):
    ``(cases generating from each found text prompt, per-attack prompt, losses and seconds)``."""
    jobs = plan.discrete_tokens
    references = _references(pipe, plan, jobs, settings.reference, context, state)
    results = distributed_map(
        lambda pair: _with_bar(discrete_token_attack, "discrete-token attack", settings.steps, state)(
            pipe, pair[0].prompt, plan.concept, reference=pair[1], settings=settings, sampler=plan.sampler),
        list(zip(jobs, references, strict=True)), state,
    )
    cases: list[EvalCase] = []
    info: list[dict[str, Any]] = []
    for job, res in zip(jobs, results, strict=True):
        cases += [EvalCase(ATTACK_PREFIX + "discrete_tokens", res.prompt, s, dict(job.labels), None, None,
                           job.prompt) for s in job.seeds]
        info.append({"prompt": job.prompt, "found": res.prompt, "exact": res.exact, **_record(res)})
    return cases, info


def concept_vector_cases(
    pipe: Any, plan: EvalPlan, settings: ConceptVectorSettings, state: Any
) -> tuple[list[EvalCase], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the plan's concept-vector attacks; the direction comes from every prompt of the plan's
    ``erased`` group that names the concept. ``(cases: embedding level then token level, {key: shifted
    embeddings}, per-attack found prompt, losses and seconds)``."""
    jobs = plan.concept_vector
    named = [c.prompt for c in plan.cases if c.group == "erased" and c.prompt]
    pair_prompts = [p for p in dict.fromkeys(named) if plan.concept.lower() in p.lower()]
    results = distributed_map(
        lambda job: _with_bar(concept_vector_attack, "concept-vector attack", settings.steps, state)(
            pipe, job.prompt, plan.concept, neutral=plan.neutral, pair_prompts=pair_prompts or None,
            settings=settings),
        jobs, state,
    )
    cases, embeds = _embedding_cases("concept_vector", jobs, results)
    info: list[dict[str, Any]] = []
    for job, res in zip(jobs, results, strict=True):
        cases += [EvalCase(ATTACK_PREFIX + "concept_vector_tokens", res.token_prompt, s, dict(job.labels),
                           None, None, job.prompt) for s in job.seeds]
        info.append({"prompt": job.prompt, "innocuous": res.innocuous, "found": res.token_prompt,
                     "exact": res.exact, "vector_norm": res.vector_norm, "pairs": len(pair_prompts) or 1,
                     **_record(res)})
    return cases, embeds, info


def _embedding_cases(
    attack: str, jobs: list[Any], results: list[Any]
) -> tuple[list[EvalCase], dict[str, torch.Tensor]]:
    """Cases drawing each result's ``prompt_embeds`` (kept under ``"<attack><j>"``), one per job seed."""
    cases: list[EvalCase] = []
    embeds: dict[str, torch.Tensor] = {}
    for j, (job, res) in enumerate(zip(jobs, results, strict=True)):
        key = f"{attack}{j}"
        embeds[key] = res.prompt_embeds.cpu()
        cases += [EvalCase(ATTACK_PREFIX + attack, None, s, dict(job.labels), None, key, job.prompt)
                  for s in job.seeds]
    return cases, embeds


def _record(res: Any) -> dict[str, Any]:
    """What every optimised attack reports: its losses, seconds and steps."""
    return {"initial_loss": res.initial_loss, "final_loss": res.final_loss, "seconds": round(res.seconds, 3),
            "steps": len(res.losses)}
