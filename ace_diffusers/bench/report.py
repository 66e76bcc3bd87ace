"""Render the benchmark result (the JSON ``ace-diffusers bench`` writes) as Markdown, targets and plots.

Everything here is a pure function of the result dict, so a saved ``benchmarks.json`` can be re-rendered
(``ace-diffusers bench --from-json``) and the formatting is tested without generating a single image.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from . import mass, trainer_report
from .closed_form import TARGET_SECONDS_PER_CONCEPT, target_checks
from .deploy import kept_section
from .efficacy_plans import ATTACK_NAMES, METHODS
from .inference import size_targets
from .ops import ops_markdown, ops_target
from .plots import PLOTS, plot_asr, plot_fit_seconds, plot_h, plot_overhead, plots
from .results import (
    TARGET_ASR,
    TARGET_H,
    TARGET_OVERHEAD_1,
    TARGET_OVERHEAD_100,
    TARGET_SPEEDUP,
    display_label,
    erasures_of,
    mean_h,
    method_keys,
    pooled_asr,
)

# Importable from here as before the plots and the result readers got their own modules.
__all__ = ["PLOTS", "TARGET_ASR", "TARGET_H", "TARGET_OVERHEAD_1", "TARGET_OVERHEAD_100", "TARGET_SPEEDUP",
           "efficacy_markdown", "inference_markdown", "markdown", "plot_asr", "plot_fit_seconds", "plot_h",
           "plot_overhead", "plots", "pooled_asr", "speed_markdown", "targets", "write"]
# sections other commands write into the same page, kept when the suite rewrites it
KEPT_SECTIONS = ((trainer_report.SECTION, trainer_report.HEADING), (mass.SECTION, mass.HEADING))


# ---------------------------------------------------------------------- small helpers
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _secs(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def _table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _target(target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": met}


# ---------------------------------------------------------------------- targets
def _efficacy_targets(erasures: list[dict[str, Any]], asr: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """H of ACE full (single and multi-concept), its ASR per attack, and its H against each baseline."""
    rows: list[dict[str, Any]] = []
    singles = [e for e in erasures if len(e["concepts"]) == 1]
    multis = [e for e in erasures if len(e["concepts"]) > 1]
    scopes = (("single-concept erasures", singles), ("multi-concept adapters (3, 5 concepts)", multis))
    for scope, group in scopes:
        h = mean_h(group, "ace_full")
        detail = ", ".join(f"{display_label(e['label'], e)} {e['methods']['ace_full']['metrics']['h']:.3f}"
                           for e in group if "ace_full" in e["methods"])
        rows.append(_target(f"ACE full: H ≥ {TARGET_H:.2f} (mean over {scope})",
                            f"{_num(h)} ({detail})" if h is not None else "not measured",
                            None if h is None else h >= TARGET_H))
    for attack, name in ATTACK_NAMES.items():
        a = asr.get(attack)
        if a is None or a["asr"] is None:
            rows.append(_target(f"ACE full: ASR ≤ {100 * TARGET_ASR:.0f} % — {name}", "not measured", None))
        else:
            rows.append(_target(f"ACE full: ASR ≤ {100 * TARGET_ASR:.0f} % — {name}",
                                f"{_pct(a['asr'])} ({a['hits']}/{a['n']} images)", a["asr"] <= TARGET_ASR))
    for baseline in ("uce", "esd_x"):
        target = f"ACE full H above {METHODS[baseline]} (mean over all erasures)"
        both = [e for e in erasures if "ace_full" in e["methods"] and baseline in e["methods"]]
        if not both:
            rows.append(_target(target, "not measured", None))
            continue
        base_h = mean_h(both, baseline)
        ace_both = mean_h(both, "ace_full")
        wins = sum(
            e["methods"]["ace_full"]["metrics"]["h"] > e["methods"][baseline]["metrics"]["h"] for e in both
        )
        rows.append(_target(target, f"ACE {ace_both:.3f} vs {METHODS[baseline]} {base_h:.3f}; higher on "
                                    f"{wins}/{len(both)} erasures", ace_both > base_h))
    return rows


def _cost_targets(sections: dict[str, Any], erasures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Inference overhead, closed-form seconds at SD1.5 shape, and ACE full's fit time against ESD-x's."""
    rows: list[dict[str, Any]] = []
    over = (sections.get("inference") or {}).get("overhead")
    for n, limit in ((1, TARGET_OVERHEAD_1), (100, TARGET_OVERHEAD_100)):
        ratio = (over or {}).get("ratio_vs_stock", {}).get(f"ACE {n}")
        rows.append(_target(f"inference overhead ≤ {limit:.2f}× ({n} concept{'s' if n > 1 else ''})",
                            "not measured" if ratio is None else f"{ratio:.3f}×",
                            None if ratio is None else ratio <= limit))

    if (sections.get("inference") or {}).get("ops"):
        rows.append(_target(*ops_target(sections["inference"]["ops"])))
    rows += [_target(*t) for t in size_targets((sections.get("inference") or {}).get("sizes") or [])]
    speed = (sections.get("speed") or {}).get("closed_form")
    if speed:
        for r in speed["rows"]:
            for target, measured, met in target_checks(r):
                rows.append(_target(f"closed form at SD1.5 shape: {target}", measured, met))
    else:
        rows.append(_target(f"closed form at SD1.5 shape: ≤ {TARGET_SECONDS_PER_CONCEPT} s/concept",
                            "not measured", None))

    target = f"ACE full fit ≥ {TARGET_SPEEDUP:.0f}× faster than ESD-x at equal or better Acc_e"
    pairs = [e for e in erasures if "ace_full" in e["methods"] and "esd_x" in e["methods"]]
    if not pairs:
        return rows + [_target(target, "not measured", None)]
    ace_s = sum(e["methods"]["ace_full"]["seconds"] for e in pairs)
    esd_s = sum(e["methods"]["esd_x"]["seconds"] for e in pairs)
    ace_e = statistics.fmean(e["methods"]["ace_full"]["metrics"]["acc_e"] for e in pairs)
    esd_e = statistics.fmean(e["methods"]["esd_x"]["metrics"]["acc_e"] for e in pairs)
    speedup = esd_s / ace_s if ace_s > 0 else float("inf")
    measured = (f"ESD-x ÷ ACE full = {speedup:.2f}× ({esd_s:.0f} s vs {ace_s:.0f} s over {len(pairs)} "
                f"erasures); Acc_e ACE full {_pct(ace_e)} vs ESD-x {_pct(esd_e)}")
    rows.append(_target(target, measured, speedup >= TARGET_SPEEDUP and ace_e <= esd_e))
    return rows


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{target, measured, met}]``; ``met`` is None when the section behind it was not run."""
    erasures = erasures_of(result)
    asr = pooled_asr(result, "ace_full") if erasures else {}
    return _efficacy_targets(erasures, asr) + _cost_targets(result.get("sections", {}), erasures)


CONTEXT_COLUMNS = {
    "acc_heldout": "Acc_u",
    "in_context": "in ctx",
    "in_context_colour": "in ctx colour",
    "erased_as_none": "→ none",
    "erased_as_other": "→ other",
}
CONTEXT_HELP = {
    "acc_heldout": "Acc_g on the held-out split: words no training caption contains that the base model "
    "draws as the shape (lower is better; `ace-diffusers shapes heldout`);",
    "in_context": "the kept object is still drawn, as its shape, at its position (higher is better; compare "
    "the base model's row);",
    "in_context_colour": "... and in its colour (higher is better);",
    "erased_as_none": "images of the erased concept's prompts that show nothing: the concept went to the "
    "empty anchor;",
    "erased_as_other": "images of the erased concept's prompts that show another shape (or, for a style, "
    "another fill) instead.",
}


def _column_help() -> list[str]:
    return [
        "Further columns: generalisation to never-trained words, and where the erasure acts, from two-object "
        "prompts (the erased concept on the left, a kept object with its own colour and style on the right) "
        "and from the erased concept's own prompts:",
        "",
        *[f"- **{name}** — {CONTEXT_HELP[key]}" for key, name in CONTEXT_COLUMNS.items()],
        "",
    ]


def _status(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


# ---------------------------------------------------------------------- markdown
def _efficacy_rows(erasure: dict[str, Any], methods: list[str], first: str) -> list[list[str]]:
    rows = []
    for k, method in enumerate(methods):
        entry = erasure["methods"].get(method)
        if entry is None:
            continue
        m = entry["metrics"]
        attacks = [_pct(entry["attacks"].get(a, {}).get("asr")) for a in ATTACK_NAMES]
        rows.append([first if k == 0 else "", METHODS.get(method, method), _pct(m.get("acc_e")),
                     _pct(m.get("acc_s")), _pct(m.get("acc_g")), _num(m.get("h")),
                     *[_pct(m.get(c)) for c in CONTEXT_COLUMNS], _secs(entry["seconds"]), *attacks])
    return rows


def efficacy_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    eff = result["sections"]["efficacy"]
    plan = eff["plan"]
    methods = method_keys(result)
    soft = eff["soft_prompt"]
    colours = ", ".join(plan["colours"]) if plan["colours"] else "all 8"
    lines = [
        "## 1. Efficacy on the miniature world",
        "",
        f"Measured in {eff['seconds']:.0f} s. Each erasure is fitted by every method on the same data: the "
        "concept's canonical word only (its trained synonyms are held out and measure Acc_g), the neutral "
        "anchor (empty for a shape, `plain` for a fill style) and the concepts to preserve; a multi-concept "
        "adapter drops every template that mentions an erased concept, so no preservation prompt contains "
        f"one. Images come from fixed seeds ({plan['images_per_prompt']} per prompt, colours: {colours}; "
        f"sampler {eff['sampler']}) and are judged by the bundled classifier. Acc_e: erased concept still "
        "drawn (lower is better); Acc_s: other concepts drawn correctly (higher); Acc_g: held-out synonyms "
        "still drawn (lower); H = 3 / (1/(1−Acc_e) + 1/Acc_s + 1/(1−Acc_g)). ASR: fraction of attack images "
        "in which the classifier sees an erased concept (lower is better); for the base model it is how "
        "often the attack prompt draws the concept when nothing is erased.",
        "",
        *_column_help(),
        "Settings: ACE closed form = `fit_adapter` defaults; ACE full = "
        + (f"`ACETrainer(steps={plan['ace_steps']})`; " if plan.get("ace_steps") is not None
           else "`ACETrainer` defaults (450 fine-tuning steps, +50 per extra concept); ")
        + "UCE = published settings (bare concept, last token, λ = 0.5, no gate); ESD-x = negative-guidance "
          f"fine-tuning of every cross-attention weight, {plan['esd_steps']} Adam steps per concept (lr "
          f"1e-4, η = 1), a bank of {plan['esd_trajectories']} frozen-model trajectories for each of the "
          f"concept's first {plan['esd_prompts']} fit prompts (several concepts: one joint run). "
          f"Soft-prompt attack: {soft['steps']} Adam steps on the concept's input token embeddings against "
          f"the erased model, objective `{soft['objective']}` (target `{soft['target']}`), "
          f"{plan['soft_prompts']} prompt(s) per concept. Fit seconds are wall time on this machine.",
        "",
        f"![H per method and erasure]({image_dir}/{PLOTS['h']})",
        "",
        "### Each shape erased alone",
        "",
    ]
    head = ["erasure", "method", "Acc_e", "Acc_s", "Acc_g", "H", *CONTEXT_COLUMNS.values(), "fit s",
            *[f"ASR {n}" for n in ATTACK_NAMES.values()]]
    singles = [e for e in eff["erasures"] if e["kind"] == "single"]
    lines += _table(head, [r for e in singles for r in _efficacy_rows(e, methods, e["label"])])
    lines += ["", "### Multi-concept adapters", "",
              "One adapter (or one edit) erases every concept at once; metrics are means over its concepts, "
              "attack images are pooled.", ""]
    by_label = {e["label"]: e for e in eff["erasures"]}
    multi_rows = []
    for n, label in sorted(eff["multi"].items(), key=lambda kv: int(kv[0])):
        e = by_label[label]
        first = f"{n}: {', '.join(e['concepts'])}"
        multi_rows += _efficacy_rows(e, methods, first)
    lines += _table(["concepts"] + head[1:], multi_rows)
    lines += ["", "### Attack success rate per attack", "",
              "Every attack image of every erasure above, pooled (hits / images).", ""]
    lines += _table(["method", *ATTACK_NAMES.values()], _pooled_asr_rows(result, methods))
    lines += ["", f"![ASR per attack and method]({image_dir}/{PLOTS['asr']})", ""]
    return lines


def _pooled_asr_rows(result: dict[str, Any], methods: list[str]) -> list[list[str]]:
    """Per method: every attack's pooled ASR with its hits / images."""
    asr_rows = []
    for method in methods:
        pooled = pooled_asr(result, method)
        asr_rows.append([METHODS.get(method, method)] + [
            f"{_pct(pooled[a]['asr'])} ({pooled[a]['hits']}/{pooled[a]['n']})" if a in pooled else "–"
            for a in ATTACK_NAMES])
    return asr_rows


def _ranges(row: dict[str, Any]) -> str:
    """The sentence on a row timed as the median of several fits: each timing's range."""
    ranges = ", ".join(  # the prepared timings (cold and preparation are timed once)
        f"{label} {row[f'{key}_seconds_range'][0]}–{row[f'{key}_seconds_range'][1]} s"
        for key, label in (("new_process", "new process"), ("warm", "warm")) if f"{key}_seconds_range" in row
    )
    return (f" The {row['concepts']}-concept prepared timings are medians of {row['fits_per_timing']} fits, "
            f"each of a new concept (ranges: {ranges}).")


def _closed_form_lines(cf: dict[str, Any]) -> list[str]:
    """The closed-form timings at SD1.5 shape: what each column means, and the table."""
    lines = [
        f"`erase_concept(..., load=False)` on {cf['model']}; pipeline built in {cf['build_seconds']} s. Each "
        "timing fits concepts not seen before, after one untimed warm-up fit (a process's first fit also "
        "pays its start-up; it took " + str(cf.get("warmup_seconds", "?")) + " s). Cold = nothing cached: "
        "the fit also encodes every prompt that does not depend on the concept (neutral anchor, preservation "
        "and unrelated prompts, template prefixes), once per text encoder and kind, and a fit of up to 16 "
        "concepts, which mines each concept's neighbours, also encodes the vocabulary words it compares them "
        "with. Preparation = that part alone (the prompts and the whole vocabulary table), `prepare_erasure("
        "pipe, kind=\"style\")` from an empty cache, which a service runs at start-up. New process = a fit "
        "after it with the in-memory cache emptied (what a fresh process pays once the text encoder was used "
        "or prepared on the machine); warm = a further fit in the same process. Cold and preparation are "
        "timed once per row. The per-concept targets are checked on the prepared fits (1 and 10 concepts "
        "include mining; 100 are not mined), the 100-concept one cold."
        + "".join(_ranges(r) for r in cf["rows"] if r.get("fits_per_timing", 1) > 1),
        "",
    ]
    lines += _table(["concepts", "rank", "cold s", "cold s/concept", "preparation s", "new process s",
                     "new process s/concept", "warm s", "warm s/concept", "adapter MB (fp16)"],
                    [[str(r["concepts"]), str(r["rank"]), _num(r["cold_seconds"], 2),
                      _num(r["cold_seconds_per_concept"]), _num(r.get("preparation_seconds"), 2),
                      _num(r.get("new_process_seconds"), 2), _num(r.get("new_process_seconds_per_concept")),
                      _num(r["warm_seconds"], 2), _num(r["warm_seconds_per_concept"]),
                      _num(r["adapter_mb_fp16"], 2)]
                     for r in cf["rows"]])
    return lines


def _fit_time_lines(erasures: list[dict[str, Any]], image_dir: str) -> list[str]:
    """Seconds to fit each erasure of the efficacy section, per method, and ESD-x against ACE full."""
    lines = ["### Fit time per method on the miniature world", "",
             "Seconds to fit each erasure of section 1 (ESD-x includes drawing its trajectory bank).", ""]
    rows = []
    for e in erasures:
        m = e["methods"]
        sec = {k: m[k]["seconds"] if k in m else None for k in ("ace_cf", "ace_full", "uce", "esd_x")}
        measured = sec["esd_x"] is not None and sec["ace_full"]
        ratio = f"{sec['esd_x'] / sec['ace_full']:.2f}×" if measured else "–"
        acc = [_pct(m[k]["metrics"]["acc_e"]) if k in m else "–" for k in ("ace_full", "esd_x")]
        rows.append([display_label(e["label"], e), *[_secs(sec[k]) for k in sec], ratio, *acc])
    lines += _table(["erasure", "ACE closed form s", "ACE full s", "UCE s", "ESD-x s", "ESD-x ÷ ACE full",
                     "Acc_e ACE full", "Acc_e ESD-x"], rows)
    lines += ["", f"![fit seconds per method]({image_dir}/{PLOTS['fit_seconds']})", ""]
    return lines


def speed_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    speed = result["sections"]["speed"]
    cf = speed["closed_form"]
    lines = ["## 2. Speed", "", f"Measured in {speed['seconds']:.0f} s.", "",
             "### Closed form at SD1.5 shape", ""]
    lines += _closed_form_lines(cf)
    lines += ["", f"Peak extra memory during the fits: {cf['peak_extra_rss_mb']} MB.", ""]
    erasures = erasures_of(result)
    if erasures:
        lines += _fit_time_lines(erasures, image_dir)
    return lines


def inference_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    inf = result["sections"]["inference"]
    lines = ["## 3. Inference overhead", "", f"Measured in {inf['seconds']:.0f} s.", ""]
    over = inf.get("overhead")
    if over:
        lines += [
            f"One denoising step of an {over.get('model', 'SD1.5-shaped UNet')}, latent {over['latent']}×"
            f"{over['latent']}, batch 2 (classifier-free guidance), {over['threads']} threads; the "
            f"configurations are timed interleaved, {over['rounds']} rounds, medians compared. `ACE n`: an "
            "adapter of the rank `erase_concept` fits for n concepts, applied by the gated processor; "
            "`fused`: an adapter fused into the K/V weights (`fuse_adapter`) and unloaded, so stock "
            "processors run on edited weights of the stock shapes — the same cost whatever the number of "
            "concepts fused.",
            "",
        ]
        lines += _table(["configuration", "median s/step", "÷ stock"],
                        [[k, _num(v, 4), f"{over['ratio_vs_stock'][k]:.3f}×"]
                         for k, v in over["median_seconds"].items()])
        lines += ["", f"![overhead vs concepts]({image_dir}/{PLOTS['overhead']})", ""]
    lines += ops_markdown(inf.get("ops"))
    lines += ["## 4. Adapter size", "",
              "Parameters of an adapter of `erase_concept`'s default rank, bytes at fp16: the closed form's "
              "file (its text-space form: one text map shared by every layer, the per-layer factors "
              "rebuilt from the model's own K/V weights at load) and, for comparison, an adapter that "
              "stores every layer's K and V factors and gate (what fine-tuning produces).", ""]
    lines += _table(["model", "layers", "concepts", "rank", "parameters", "MB (fp16)", "KB per concept",
                     "fine-tuned MB (fp16)"],
                    [[r["model"], str(r["layers"]), str(r["concepts"]), str(r["rank"]),
                      f"{r['parameters']:,}", _num(r["mb_fp16"], 2), _num(r["kb_fp16_per_concept"], 1),
                      _num(r.get("fine_tuned_mb_fp16", r["mb_fp16"]), 2)]
                     for r in inf["sizes"]])
    lines.append("")
    return lines


def markdown(result: dict[str, Any], image_dir: str = "images", json_name: str = "benchmarks.json") -> str:
    """The whole ``benchmarks.md`` page."""
    sections = result.get("sections", {})
    lines = [
        "# Benchmarks",
        "",
        "Written by `ace-diffusers bench`; do not edit by hand (every number below comes from "
        f"[{json_name}]({json_name}), written by the same run). Erasure quality is measured on the "
        "[miniature world](miniature_world.md); costs at real model shapes use random weights (costs are "
        "real, outputs are not). Real SD/SDXL checkpoints need a GPU and Hub access and were not measured "
        "here.",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- total time: {result['seconds']:.0f} s"
        + (f" (finished {result['date']})" if result.get("date") else ""),
        "- full benchmark: `ace-diffusers bench` (the quick one, `--quick`, uses fewer shapes, images and "
        "steps)",
        "",
        "## Targets",
        "",
    ]
    lines += _table(["target", "measured", "status"], [[t["target"], t["measured"], _status(t["met"])]
                                                        for t in targets(result)])
    lines.append("")
    if sections.get("efficacy"):
        lines += efficacy_markdown(result, image_dir)
    if sections.get("speed"):
        lines += speed_markdown(result, image_dir)
    if sections.get("inference"):
        lines += inference_markdown(result, image_dir)
    return "\n".join(lines).rstrip() + "\n"


def write(result: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write ``output`` (Markdown), ``benchmarks.json`` beside it and the plots in ``images/``, atomically."""

    output = Path(output)
    paths: dict[str, Path] = {}
    for name, data in plots(result).items():
        paths[name] = atomic_write_bytes(output.parent / "images" / name, data)
    paths["json"] = atomic_write_json(output.with_suffix(".json"), result)
    page = markdown(result, "images", paths["json"].name)
    page += "".join(kept_section(output, markers, heading) for markers, heading in KEPT_SECTIONS)
    paths["markdown"] = atomic_write_text(output, page)
    return paths

