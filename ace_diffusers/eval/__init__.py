"""How an erasure is judged: MACE metrics, judges, attacks, evaluation runs and reports.

Typical use (the miniature world)::

    from ace_diffusers.eval import ShapesJudge, evaluate, shapes_plan, write_report

    plan = shapes_plan("circle", images_per_prompt=2)
    judges = {"shape": ShapesJudge(head="shape"), "colour": ShapesJudge(head="colour")}
    evaluation = evaluate(pipe, plan, judges)          # after (adapters on) and before (adapters off)
    write_report(evaluation, "eval-circle")            # results.json, report.md, grid.png, plots

For a weight-editing baseline pass its undo handle: ``evaluate(..., original=edit.original)``.
The command line is ``ace-diffusers eval`` (:mod:`ace_diffusers.cli.eval`).
"""

from __future__ import annotations

from .attacks import (
    ALL_ATTACKS,
    PROMPT_ATTACKS,
    AttackPrompt,
    misspellings,
    prompt_attacks,
    weighted_variants,
)
from .common import ace_disabled, distributed_map, partial_state
from .judges import CallableJudge, CLIPZeroShotJudge, Judge, ShapesJudge, shapes_judges
from .metrics import (
    accuracy,
    attack_success_rate,
    erasure_metrics,
    harmonic,
    recognition_rate,
    wilson_interval,
)
from .plans import EvalCase, EvalPlan, prompt_plan, shapes_plan
from .report import build_results, write_report
from .runner import EvalResult, evaluate, generate_cases, run_cases, score
from .soft_prompt import (
    SoftPromptReference,
    SoftPromptResult,
    SoftPromptSettings,
    build_soft_prompt_reference,
    soft_prompt_attack,
)

__all__ = [
    "ALL_ATTACKS",
    "PROMPT_ATTACKS",
    "AttackPrompt",
    "CLIPZeroShotJudge",
    "CallableJudge",
    "EvalCase",
    "EvalPlan",
    "EvalResult",
    "Judge",
    "ShapesJudge",
    "shapes_judges",
    "SoftPromptReference",
    "SoftPromptResult",
    "SoftPromptSettings",
    "accuracy",
    "ace_disabled",
    "attack_success_rate",
    "build_results",
    "build_soft_prompt_reference",
    "distributed_map",
    "erasure_metrics",
    "evaluate",
    "generate_cases",
    "harmonic",
    "misspellings",
    "partial_state",
    "prompt_attacks",
    "prompt_plan",
    "recognition_rate",
    "run_cases",
    "score",
    "shapes_plan",
    "soft_prompt_attack",
    "weighted_variants",
    "wilson_interval",
    "write_report",
]
