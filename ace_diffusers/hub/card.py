"""The Hub model card of an adapter (``README.md``), built from its ``ace_config.json``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..format import CONFIG_NAME, WEIGHTS_NAME
from .common import LIBRARY_NAME, is_repo_id

#: Written into the usage snippet of a card built without a repo id; ``push_adapter_folder``
#: replaces it with the repo the card is pushed to.
REPO_ID_PLACEHOLDER = "<repo_id>"
BASE_TAGS = ("text-to-image", "diffusers", "ace", "concept-erasure", "stable-diffusion")


def build_model_card(
    config: Mapping[str, Any],
    *,
    eval_markdown: str | None = None,
    image_relpath: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    eval_results: Mapping[str, float] | None = None,
) -> ModelCard:
    """Build the Hub model card (``README.md``) for an adapter from its ``ace_config.json`` content.

    Args:
        config: the adapter config (``ACEAdapter.config``): concepts, neutral anchors, kind, rank,
            method, fit settings, base model, fingerprint, version.
        eval_markdown: a Markdown evaluation table/report to include verbatim.
        image_relpath: path, relative to the repo root, of a sample image to show.
        repo_id: the repo the card is for, used in the usage snippet; when ``None`` the snippet holds
            :data:`REPO_ID_PLACEHOLDER`, which :func:`push_adapter_folder` fills in.
        license: the Hub license id (``"creativeml-openrail-m"``, ``"mit"``, ...); an adapter is
            a derivative of its base model, so :meth:`ACEAdapter.push_to_hub` passes the base model's
            license when it can read it and none is given. Omitted when unknown.
        eval_results: ``{metric: value}`` (e.g. ``{"Acc_e": 0.03, "H": 0.91}``), written as the card's
            ``model-index`` so the Hub shows them as evaluation results.

    The metadata has ``library_name: ace-diffusers``, ``pipeline_tag: text-to-image``, ``base_model`` (with
    ``base_model_relation: adapter``; only when the config's base model is a Hub model id, since the
    Hub rejects local paths there), discovery tags and machine-readable ``erased_concepts`` /
    ``neutral_anchors``.
    """
    concepts = [str(c) for c in config.get("concepts") or []]
    neutral = [str(n) for n in config.get("neutral") or []]
    kind = config.get("kind")
    base_model = _hub_model_id(config.get("base_model"))
    tags = list(BASE_TAGS)
    if kind and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", str(kind)):
        tags.append(f"concept-erasure-{str(kind).lower()}")
    if base_model and "xl" in str(base_model).lower():
        tags.append("stable-diffusion-xl")
    extra: dict[str, Any] = {"erased_concepts": concepts}
    if neutral:
        extra["neutral_anchors"] = neutral
    if base_model:
        extra["base_model_relation"] = "adapter"
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="text-to-image",
        license=license,
        base_model=base_model,
        tags=tags,
        **_model_index(concepts, eval_results),
        **extra,
    )
    text = _card_text(config, concepts, neutral, repo_id or REPO_ID_PLACEHOLDER, eval_markdown, image_relpath)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def base_model_license(base_model: str | None, *, token: str | bool | None = None) -> str | None:
    """The ``license`` of the base model's Hub card, or ``None`` (not a Hub id, offline, no card, none)."""
    repo = _hub_model_id(base_model)
    if repo is None:
        return None
    try:
        value = ModelCard.load(repo, token=token).data.license
    except Exception:  # noqa: BLE001 - best effort: a card without a license is still a valid card
        return None
    return value if isinstance(value, str) and value else None


def _model_index(concepts: list[str], eval_results: Mapping[str, float] | None) -> dict[str, Any]:
    """``model_name`` + ``eval_results`` for ``ModelCardData`` (its ``model-index``), or nothing."""
    if not eval_results:
        return {}
    name = ", ".join(concepts[:5]) or "concepts"
    results = [
        EvalResult(
            task_type="text-to-image",
            task_name="Concept erasure",
            dataset_type="ace-diffusers/erasure-eval",
            dataset_name=f"Erasure evaluation of {name}",
            metric_type=str(metric),
            metric_name=str(metric),
            metric_value=float(value),
        )
        for metric, value in eval_results.items()
    ]
    return {"model_name": f"ACE erasure of {name}", "eval_results": results}


def _hub_model_id(value: Any) -> str | None:
    """``value`` if it looks like a Hub model id (not a local path), else ``None``."""
    if not isinstance(value, str) or not value or not is_repo_id(value) or Path(value).expanduser().exists():
        return None
    return value


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = " ".join(text.split())
    if len(text) > 160:
        text = text[:157] + "..."
    return text.replace("|", "\\|") or " "


def _card_text(
    config: Mapping[str, Any],
    concepts: list[str],
    neutral: list[str],
    repo_id: str,
    eval_markdown: str | None,
    image_relpath: str | None,
) -> str:
    lines = _intro(config, concepts) + _concept_lines(concepts, neutral) + _adapter_lines(config)
    lines += _usage_lines(config, concepts, repo_id)
    if eval_markdown and eval_markdown.strip():
        lines += ["", "## Evaluation", "", eval_markdown.strip()]
    if image_relpath:
        lines += ["", "## Samples", "", f"![Samples with and without the adapter]({quote(image_relpath)})"]
    lines += [
        "",
        "## Limitations",
        "",
        "Erasure lowers the chance that the concepts appear; it is not a guarantee. Unlisted synonyms, "
        "paraphrases or adversarial prompts may still evoke them, and nearby concepts may change slightly. "
        "Evaluate on your own prompts before relying on it as a safety component.",
        "",
    ]
    return "\n".join(lines)


def _intro(config: Mapping[str, Any], concepts: list[str]) -> list[str]:
    base_model = config.get("base_model")
    hub_base = _hub_model_id(base_model)
    title = ", ".join(concepts[:5]) + (f" and {len(concepts) - 5} more" if len(concepts) > 5 else "")
    return [
        f"# ACE concept-erasure adapter: {title or 'no concepts'}",
        "",
        "An [ACE](https://arxiv.org/abs/2504.11850) (Attentional Concept Erasure) adapter for 🧨 diffusers, "
        "made "
        "with `ace-diffusers`. It edits the cross-attention key/value projections with a *gated* low-rank "
        "delta: prompts that mention an erased concept are steered to its neutral anchor, while the gate "
        "leaves unrelated prompts untouched. It is not a standalone model: load it on top of "
        + (
            f"[`{hub_base}`](https://huggingface.co/{hub_base})."
            if hub_base
            else (f"`{base_model}`." if base_model else "its base pipeline.")
        ),
    ]


def _concept_lines(concepts: list[str], neutral: list[str]) -> list[str]:
    lines = ["", "## Erased concepts", ""]
    if neutral and len(neutral) == len(concepts):
        lines += ["| Erased concept | Neutral anchor |", "|---|---|"]
        lines += [
            f"| {_cell(c)} | {_cell(n) if n else '(empty prompt)'} |"
            for c, n in zip(concepts, neutral, strict=True)
        ]
    else:
        lines += [f"- {_cell(c)}" for c in concepts] or ["(none)"]
        if neutral:
            lines += ["", "Neutral anchors: " + ", ".join(_cell(n) for n in neutral)]
    return lines


def _adapter_lines(config: Mapping[str, Any]) -> list[str]:
    fingerprint = config.get("fingerprint") or {}
    n_layers = len(fingerprint.get("layers") or {}) if isinstance(fingerprint, Mapping) else 0
    details = [
        ("Kind", config.get("kind") or "unspecified"),
        ("Rank", config.get("rank")),
        ("Method", config.get("method")),
        ("Base model", config.get("base_model") or "unspecified"),
        ("Cross-attention layers", n_layers or None),
        ("Architecture hash", fingerprint.get("hash") if isinstance(fingerprint, Mapping) else None),
        ("Format version", config.get("format_version")),
        ("Created with", config.get("created_with")),
    ]
    lines = ["", "## Adapter", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in details if v is not None]
    fit = config.get("fit") or {}
    if isinstance(fit, Mapping) and fit:
        lines += ["", "### Fit settings", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {_cell(str(k))} | {_cell(v)} |" for k, v in fit.items()]
    return lines


def _usage_lines(config: Mapping[str, Any], concepts: list[str], repo_id: str) -> list[str]:
    base_model = config.get("base_model")
    example = json.dumps(f"a photo of {concepts[0]}" if concepts else "a photo", ensure_ascii=False)
    return [
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        "import ace_diffusers  # adds load_ace_adapter() and friends to diffusers pipelines",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_model or "<base-model-id>"}")',
        f'pipe.load_ace_adapter("{repo_id}")',
        f"image = pipe({example}).images[0]",
        "```",
        "",
        "The adapter alone (no pipeline): "
        f'`ace_diffusers.ACEAdapter.from_pretrained("{repo_id}")`. Files: `{CONFIG_NAME}` (settings, JSON) '
        f"and `{WEIGHTS_NAME}` (tensors, safetensors): loading never executes code.",
    ]
