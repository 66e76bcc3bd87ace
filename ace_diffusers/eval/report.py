"""Write an evaluation to a folder: ``results.json``, ``report.md``, ``grid.png`` (before/after images),
``metrics.png`` and ``attacks.png`` (matplotlib, Agg). Every file is written atomically (temporary
file + ``os.replace``), so a crashed or concurrent run never leaves a half-written report.
"""

from __future__ import annotations

import io
import math
import platform
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .plans import ATTACK_PREFIX, SHAPES_GROUPS
from .runner import EvalResult

METRIC_NAMES = {
    "acc_e": "Acc_e (erased concept still shown, lower is better)",
    "acc_g": "Acc_g (synonyms still shown, lower is better)",
    "acc_s": "Acc_s (other concepts correct, higher is better)",
    "colour": "colour accuracy on other concepts (higher is better)",
    "h": "H (harmonic mean, higher is better)",
    "acc_heldout": "Acc_g on never-trained words (held-out split, lower is better)",
    "in_context": "the other object of a two-object prompt still drawn (higher is better)",
    "in_context_colour": "... in its colour (higher is better)",
    "in_context_style": "... in its style (higher is better)",
    "erased_as_none": "erased-concept images that show nothing",
    "erased_as_other": "erased-concept images that show something else",
}


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def build_results(evaluation: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready summary of :func:`ace_diffusers.eval.runner.evaluate`'s output."""
    plan = evaluation["plan"]
    after: EvalResult = evaluation["after"]
    before: EvalResult | None = evaluation["before"]
    cases = evaluation["cases"]
    attacks = {}
    for name, entry in after.attacks.items():
        row = {"n": entry["n"], "asr_after": entry["asr"], "interval_after": entry["interval"]}
        if before is not None and name in before.attacks:
            row["asr_before"] = before.attacks[name]["asr"]
        attacks[name] = row
    before_index = 0
    images = []
    for i, case in enumerate(cases):
        row = case.to_dict()
        row["predicted_after"] = {h: p[i] for h, p in after.predictions.items()}
        if before is not None and case.embeds is None:
            row["predicted_before"] = {h: p[before_index] for h, p in before.predictions.items()}
            before_index += 1
        images.append(row)
    return _round({
        **(info or {}),
        "plan": plan.describe(),
        "metrics": {"before": before.metrics if before else None, "after": after.metrics},
        "groups": {"before": before.groups if before else None, "after": after.groups},
        "attacks": attacks,
        "soft_prompt": evaluation.get("soft_prompt"),
        "discrete_tokens": evaluation.get("discrete_tokens"),
        "concept_vector": evaluation.get("concept_vector"),
        "seconds": evaluation.get("seconds"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "images": images,
    })


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown(results: dict[str, Any], files: dict[str, str]) -> str:
    plan = results["plan"]
    lines = [f"# Erasure evaluation: {plan['concept']}", ""]
    for key in ("model", "method", "adapter", "judge"):
        if results.get(key):
            lines.append(f"- **{key}**: {results[key]}")
    lines += [
        f"- **erased**: {', '.join(plan['erased'])}; neutral anchor: {plan['neutral']!r}",
        f"- **synonyms** (held out): {', '.join(plan['synonyms']) or '–'}",
        f"- **other concepts**: {', '.join(plan['others'])}",
        f"- **images**: {', '.join(f'{g} {n}' for g, n in plan['groups'].items())} "
        f"({plan['images_per_prompt']} per prompt, fixed seeds); sampler {plan['sampler']}",
        "",
        "## MACE metrics",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    before, after = results["metrics"]["before"] or {}, results["metrics"]["after"]
    for key, value in after.items():
        lines.append(f"| {METRIC_NAMES.get(key, key)} | {_fmt(before.get(key))} | {_fmt(value)} |")
    if results["attacks"]:
        lines += [
            "",
            "## Attacks (ASR: fraction of attack images still showing the concept; lower is better)",
            "",
            "| attack | images | ASR before | ASR after | 95% interval (after) |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["attacks"].items():
            lo, hi = row["interval_after"]
            lines.append(f"| {name} | {row['n']} | {_fmt(row.get('asr_before'))} | {_fmt(row['asr_after'])} "
                         f"| [{lo:.2f}, {hi:.2f}] |")
    lines += _optimised_attack_lines(results)
    lines += ["", "## Per group (judge accuracy against the prompt's label)", "",
              "| group | images | before | after |", "|---|---|---|---|"]
    gb, ga = results["groups"]["before"] or {}, results["groups"]["after"]
    head = plan["head"]
    for group, entry in ga.items():
        b = gb.get(group, {}).get("accuracy", {}).get(head)
        lines.append(f"| {group} | {entry['n']} | {_fmt(b)} | {_fmt(entry['accuracy'].get(head))} |")
    lines += ["", "## Files", ""] + [f"- `{name}`: {what}" for name, what in files.items()]
    lines += ["", f"Evaluation took {results.get('seconds') or 0:.1f} s.", ""]
    return "\n".join(lines)



def _optimised_attack_lines(results: dict[str, Any]) -> list[str]:
    """One paragraph per optimised attack that ran: its settings, losses and what it found."""
    lines: list[str] = []
    soft = results.get("soft_prompt")
    if soft:
        s = soft["settings"]
        losses = ", ".join(f"{a['initial_loss']:.4g} → {a['final_loss']:.4g}" for a in soft["attacks"])
        lines += ["", f"Soft-prompt attack: {s['steps']} Adam steps, objective `{s['objective']}` "
                      f"(target `{s['target']}`), init from `{s['init']}` tokens; loss per attacked prompt "
                      f"{losses}."]
    discrete = results.get("discrete_tokens")
    if discrete:
        s = discrete["settings"]
        found = "; ".join(
            f"`{a['prompt']}` → `{a['found']}`{'' if a['exact'] else ' (re-tokenised differently)'}"
            for a in discrete["attacks"]
        )
        lines += ["", f"Discrete-token attack: {s['n_tokens']} tokens ({s['placement']}), {s['steps']} "
                      f"coordinate-search steps of {s['candidates']} candidates from the top {s['top_k']}; "
                      f"prompts found: {found}."]
    vector = results.get("concept_vector")
    if vector:
        s = vector["settings"]
        found = "; ".join(f"`{a['innocuous']}` + {s['strength']:g}·c → `{a['found']}`"
                          f"{'' if a['exact'] else ' (re-tokenised differently)'}" for a in vector["attacks"])
        lines += ["", f"Concept-vector attack: the direction c from the erased prompts (with − without the "
                      f"concept, text encoder only), strength {s['strength']:g}; `concept_vector` draws "
                      f"from the shifted embedding, `concept_vector_tokens` from words found for it "
                      f"({s['n_tokens']} tokens, {s['steps']} coordinate-search steps): {found}."]
    return lines

def image_grid(rows: list[tuple[str, torch.Tensor]], *, tile: int = 96, label_width: int = 190) -> bytes:
    """A PNG with one labelled row per ``(label, uint8 images (n, 3, H, W))``."""

    pad = 2
    columns = max((len(images) for _, images in rows), default=1)
    size = (label_width + columns * (tile + pad), max(1, len(rows)) * (tile + pad))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (tile + pad)
        draw.text((6, y + tile // 2 - 6), label, fill="black")
        for c in range(len(images)):
            array = images[c].permute(1, 2, 0).contiguous().numpy()
            picture = Image.fromarray(array)
            resample = Image.NEAREST if picture.width <= tile else Image.LANCZOS
            canvas.paste(picture.resize((tile, tile), resample), (label_width + c * (tile + pad), y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def grid_rows(evaluation: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    after: EvalResult = evaluation["after"]
    before: EvalResult | None = evaluation["before"]
    rows = []
    order = [g for g in SHAPES_GROUPS if g in after.images]
    order += [g for g in after.images if g.startswith(ATTACK_PREFIX)]
    for group in order:
        if before is not None and group in before.images:
            rows.append((f"{group} - before", before.images[group]))
        rows.append((f"{group} - after", after.images[group]))
    return rows


def _bar_chart(title: str, names: list[str], series: dict[str, list[float | None]], ylabel: str) -> bytes:
    # matplotlib is optional (the bench/test extras): only figures need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # optional, as above

    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(names)), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    colours = {"before": "#9e9e9e", "after": "#1f77b4"}
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width=width, label=label, color=colours.get(label))
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=max(1, len(series)), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def metric_plot(results: dict[str, Any]) -> bytes:
    after = results["metrics"]["after"]
    before = results["metrics"]["before"]
    names = list(after)
    series = {}
    if before:
        series["before"] = [before.get(n) for n in names]
    series["after"] = [after[n] for n in names]
    return _bar_chart(f"MACE metrics: {results['plan']['concept']}", names, series, "fraction")


def attack_plot(results: dict[str, Any]) -> bytes:
    names = list(results["attacks"])
    series = {}
    if any("asr_before" in r for r in results["attacks"].values()):
        series["before"] = [results["attacks"][n].get("asr_before") for n in names]
    series["after"] = [results["attacks"][n]["asr_after"] for n in names]
    title = f"Attack success rate: {results['plan']['concept']} (lower is better)"
    return _bar_chart(title, names, series, "ASR")


def write_report(
    evaluation: dict[str, Any], output_dir: str | Path, info: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write every report file into ``output_dir``; returns ``{kind: path}``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = build_results(evaluation, info)
    files = {
        "results.json": "all numbers, settings and every image's prompt, seed and judged labels",
        "grid.png": "before/after images (first seed of each prompt, up to 8 prompts per group)",
        "metrics.png": "MACE metrics before/after",
    }
    if results["attacks"]:
        files["attacks.png"] = "attack success rates before/after"
    paths = {"json": atomic_write_json(out / "results.json", results)}
    paths["grid"] = atomic_write_bytes(out / "grid.png", image_grid(grid_rows(evaluation)))
    paths["metrics_plot"] = atomic_write_bytes(out / "metrics.png", metric_plot(results))
    if results["attacks"]:
        paths["attacks_plot"] = atomic_write_bytes(out / "attacks.png", attack_plot(results))
    paths["markdown"] = atomic_write_text(out / "report.md", markdown(results, files))
    return paths
