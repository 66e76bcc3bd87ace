"""Render the benchmark result (the JSON ``ace-diffusers bench`` writes) as Markdown, targets and plots.

Everything here is a pure function of the result dict, so a saved ``benchmarks.json`` can be re-rendered
(``ace-diffusers bench --from-json``) and the formatting is tested without generating a single image.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .closed_form import TARGET_SECONDS_PER_CONCEPT, target_checks
from .efficacy import ATTACK_NAMES, METHODS, pool_attacks

TARGET_H = 0.90
TARGET_ASR = 0.20
TARGET_OVERHEAD_1 = 1.03
TARGET_OVERHEAD_100 = 1.10
TARGET_SPEEDUP = 10.0
PLOTS = {
    "h": "bench_h.png",
    "asr": "bench_asr.png",
    "fit_seconds": "bench_fit_seconds.png",
    "overhead": "bench_overhead.png",
}
_COLOURS = {"base": "#9e9e9e", "ace_cf": "#9ecae1", "ace_full": "#1f77b4", "uce": "#ff7f0e", "esd_x": "#2ca02c"}


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


def _erasures(result: dict[str, Any]) -> list[dict[str, Any]]:
    eff = result.get("sections", {}).get("efficacy")
    return eff["erasures"] if eff else []


def _method_keys(result: dict[str, Any]) -> list[str]:
    eff = result["sections"]["efficacy"]
    return list(eff.get("methods", METHODS))


def _display(label: str, erasure: dict[str, Any]) -> str:
    n = len(erasure["concepts"])
    return label if n == 1 else f"{n} concepts"


def pooled_asr(result: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """ASR per attack for ``method``, pooling every attack image of every erasure: ``{attack: {asr, hits, n}}``."""
    return pool_attacks(e["methods"][method]["attacks"] for e in _erasures(result) if e["methods"].get(method))


def _mean_h(erasures: list[dict[str, Any]], method: str) -> float | None:
    values = [e["methods"][method]["metrics"]["h"] for e in erasures if method in e["methods"]]
    return statistics.fmean(values) if values else None


# ---------------------------------------------------------------------- targets
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{target, measured, met}]``; ``met`` is None when the section behind it was not run."""
    rows: list[dict[str, Any]] = []
    sections = result.get("sections", {})
    erasures = _erasures(result)
    singles = [e for e in erasures if len(e["concepts"]) == 1]
    multis = [e for e in erasures if len(e["concepts"]) > 1]

    def add(target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": target, "measured": measured, "met": met})

    for scope, group in (("single-concept erasures", singles), ("multi-concept adapters (3, 5 concepts)", multis)):
        h = _mean_h(group, "ace_full")
        detail = ", ".join(f"{_display(e['label'], e)} {e['methods']['ace_full']['metrics']['h']:.3f}"
                           for e in group if "ace_full" in e["methods"])
        add(f"ACE full: H ≥ {TARGET_H:.2f} (mean over {scope})",
            f"{_num(h)} ({detail})" if h is not None else "not measured", None if h is None else h >= TARGET_H)
    asr = pooled_asr(result, "ace_full") if erasures else {}
    for attack, name in ATTACK_NAMES.items():
        a = asr.get(attack)
        if a is None or a["asr"] is None:
            add(f"ACE full: ASR ≤ {100 * TARGET_ASR:.0f} % — {name}", "not measured", None)
        else:
            add(f"ACE full: ASR ≤ {100 * TARGET_ASR:.0f} % — {name}", f"{_pct(a['asr'])} ({a['hits']}/{a['n']} images)",
                a["asr"] <= TARGET_ASR)
    for baseline in ("uce", "esd_x"):
        both = [e for e in erasures if "ace_full" in e["methods"] and baseline in e["methods"]]
        if not both:
            add(f"ACE full H above {METHODS[baseline]} (mean over all erasures)", "not measured", None)
            continue
        base_h = _mean_h(both, baseline)
        ace_both = _mean_h(both, "ace_full")
        wins = sum(e["methods"]["ace_full"]["metrics"]["h"] > e["methods"][baseline]["metrics"]["h"] for e in both)
        add(f"ACE full H above {METHODS[baseline]} (mean over all erasures)",
            f"ACE {ace_both:.3f} vs {METHODS[baseline]} {base_h:.3f}; higher on {wins}/{len(both)} erasures",
            ace_both > base_h)

    over = (sections.get("inference") or {}).get("overhead")
    for n, limit in ((1, TARGET_OVERHEAD_1), (100, TARGET_OVERHEAD_100)):
        ratio = (over or {}).get("ratio_vs_stock", {}).get(f"ACE {n}")
        add(f"inference overhead ≤ {limit:.2f}× ({n} concept{'s' if n > 1 else ''})",
            "not measured" if ratio is None else f"{ratio:.3f}×", None if ratio is None else ratio <= limit)

    speed = (sections.get("speed") or {}).get("closed_form")
    if speed:
        for r in speed["rows"]:
            for target, measured, met in target_checks(r):
                add(f"closed form at SD1.5 shape: {target}", measured, met)
    else:
        add(f"closed form at SD1.5 shape: ≤ {TARGET_SECONDS_PER_CONCEPT} s/concept", "not measured", None)

    pairs = [e for e in erasures if "ace_full" in e["methods"] and "esd_x" in e["methods"]]
    if pairs:
        ace_s = sum(e["methods"]["ace_full"]["seconds"] for e in pairs)
        esd_s = sum(e["methods"]["esd_x"]["seconds"] for e in pairs)
        ace_e = statistics.fmean(e["methods"]["ace_full"]["metrics"]["acc_e"] for e in pairs)
        esd_e = statistics.fmean(e["methods"]["esd_x"]["metrics"]["acc_e"] for e in pairs)
        speedup = esd_s / ace_s if ace_s > 0 else float("inf")
        add(f"ACE full fit ≥ {TARGET_SPEEDUP:.0f}× faster than ESD-x at equal or better Acc_e",
            f"ESD-x ÷ ACE full = {speedup:.2f}× ({esd_s:.0f} s vs {ace_s:.0f} s over {len(pairs)} erasures); "
            f"Acc_e ACE full {_pct(ace_e)} vs ESD-x {_pct(esd_e)}",
            speedup >= TARGET_SPEEDUP and ace_e <= esd_e)
    else:
        add(f"ACE full fit ≥ {TARGET_SPEEDUP:.0f}× faster than ESD-x at equal or better Acc_e", "not measured", None)
    return rows


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
        rows.append([first if k == 0 else "", METHODS.get(method, method), _pct(m.get("acc_e")), _pct(m.get("acc_s")),
                     _pct(m.get("acc_g")), _num(m.get("h")), _secs(entry["seconds"]), *attacks])
    return rows


def efficacy_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    eff = result["sections"]["efficacy"]
    plan = eff["plan"]
    methods = _method_keys(result)
    soft = eff["soft_prompt"]
    colours = ", ".join(plan["colours"]) if plan["colours"] else "all 8"
    lines = [
        "## 1. Efficacy on the miniature world",
        "",
        f"Measured in {eff['seconds']:.0f} s. Each erasure is fitted by every method on the same data: the concept's "
        "canonical word only (its trained synonyms are held out and measure Acc_g), the neutral anchor (empty for a "
        "shape, `plain` for a fill style) and the concepts to preserve; a multi-concept adapter drops every template that "
        "mentions an erased concept, so no preservation prompt contains one. Images come from fixed seeds "
        f"({plan['images_per_prompt']} per prompt, colours: {colours}; sampler {eff['sampler']}) and are judged by the "
        "bundled classifier. Acc_e: erased concept still drawn (lower is better); Acc_s: other concepts drawn correctly "
        "(higher); Acc_g: held-out synonyms still drawn (lower); H = 3 / (1/(1−Acc_e) + 1/Acc_s + 1/(1−Acc_g)). "
        "ASR: fraction of attack images in which the classifier sees an erased concept (lower is better); for the base "
        "model it is how often the attack prompt draws the concept when nothing is erased.",
        "",
        "Settings: ACE closed form = `fit_adapter` defaults; ACE full = "
        + (f"`ACETrainer(steps={plan['ace_steps']})`; " if plan.get("ace_steps") is not None
           else "`ACETrainer` defaults (450 fine-tuning steps, +50 per extra concept); ")
        + "UCE = published settings (bare concept, last token, λ = 0.5, no gate); "
        f"ESD-x = negative-guidance fine-tuning of every cross-attention weight, {plan['esd_steps']} Adam steps per "
        f"concept (lr 1e-4, η = 1), a bank of {plan['esd_trajectories']} frozen-model trajectories for each of the "
        f"concept's first {plan['esd_prompts']} fit prompts (several concepts: one joint run). Soft-prompt attack: "
        f"{soft['steps']} Adam steps on the concept's input token embeddings against the erased model, objective "
        f"`{soft['objective']}` (target `{soft['target']}`), {plan['soft_prompts']} prompt(s) per concept. "
        "Fit seconds are wall time on this machine.",
        "",
        f"![H per method and erasure]({image_dir}/{PLOTS['h']})",
        "",
        "### Each shape erased alone",
        "",
    ]
    head = ["erasure", "method", "Acc_e", "Acc_s", "Acc_g", "H", "fit s", *[f"ASR {n}" for n in ATTACK_NAMES.values()]]
    singles = [e for e in eff["erasures"] if e["kind"] == "single"]
    lines += _table(head, [r for e in singles for r in _efficacy_rows(e, methods, e["label"])])
    lines += ["", "### Multi-concept adapters", "",
              "One adapter (or one edit) erases every concept at once; metrics are means over its concepts, attack "
              "images are pooled.", ""]
    by_label = {e["label"]: e for e in eff["erasures"]}
    multi_rows = []
    for n, label in sorted(eff["multi"].items(), key=lambda kv: int(kv[0])):
        e = by_label[label]
        first = f"{n}: {', '.join(e['concepts'])}"
        multi_rows += _efficacy_rows(e, methods, first)
    lines += _table(["concepts"] + head[1:], multi_rows)
    lines += ["", "### Attack success rate per attack", "",
              "Every attack image of every erasure above, pooled (hits / images).", ""]
    asr_rows = []
    for method in methods:
        pooled = pooled_asr(result, method)
        asr_rows.append([METHODS.get(method, method)] + [
            f"{_pct(pooled[a]['asr'])} ({pooled[a]['hits']}/{pooled[a]['n']})" if a in pooled else "–"
            for a in ATTACK_NAMES])
    lines += _table(["method", *ATTACK_NAMES.values()], asr_rows)
    lines += ["", f"![ASR per attack and method]({image_dir}/{PLOTS['asr']})", ""]
    return lines


def speed_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    speed = result["sections"]["speed"]
    cf = speed["closed_form"]
    lines = ["## 2. Speed", "", f"Measured in {speed['seconds']:.0f} s.", "",
             "### Closed form at SD1.5 shape", "",
             f"`erase_concept(..., load=False)` on {cf['model']}; pipeline built in {cf['build_seconds']} s. Each timing "
             "fits concepts not seen before, after one untimed warm-up fit (a process's first fit also pays its "
             "start-up; it took " + str(cf.get("warmup_seconds", "?")) + " s). Cold = nothing cached: the fit also "
             "encodes every prompt that does not depend on the concept (neutral anchor, preservation and unrelated "
             "prompts, template prefixes), once per text encoder and kind. Preparation = that part alone, "
             "`prepare_erasure(pipe, kind=\"style\")` from an empty cache, which a service runs at start-up. New "
             "process = a fit after it with the in-memory cache emptied (what a fresh process pays once the text "
             "encoder was used or prepared on the machine); warm = a further fit in the same process. The "
             "per-concept target is checked on the prepared fits, the 100-concept one cold."
             + "".join(f" The {r['concepts']}-concept timings are medians of {r['fits_per_timing']} fits, each of a new "
                       f"concept (ranges: " + ", ".join(
                           f"{label} {r[f'{key}_seconds_range'][0]}–{r[f'{key}_seconds_range'][1]} s"
                           for key, label in (("cold", "cold"), ("preparation", "preparation"),
                                              ("new_process", "new process"), ("warm", "warm"))
                           if f"{key}_seconds_range" in r) + ")."
                       for r in cf["rows"] if r.get("fits_per_timing", 1) > 1), ""]
    lines += _table(["concepts", "rank", "cold s", "cold s/concept", "preparation s", "new process s",
                     "new process s/concept", "warm s", "warm s/concept", "adapter MB (fp16)"],
                    [[str(r["concepts"]), str(r["rank"]), _num(r["cold_seconds"], 2), _num(r["cold_seconds_per_concept"]),
                      _num(r.get("preparation_seconds"), 2), _num(r.get("new_process_seconds"), 2),
                      _num(r.get("new_process_seconds_per_concept")), _num(r["warm_seconds"], 2),
                      _num(r["warm_seconds_per_concept"]), _num(r["adapter_mb_fp16"], 2)]
                     for r in cf["rows"]])
    lines += ["", f"Peak extra memory during the fits: {cf['peak_extra_rss_mb']} MB.", ""]
    erasures = _erasures(result)
    if erasures:
        lines += ["### Fit time per method on the miniature world", "",
                  "Seconds to fit each erasure of section 1 (ESD-x includes drawing its trajectory bank).", ""]
        rows = []
        for e in erasures:
            m = e["methods"]
            sec = {k: m[k]["seconds"] if k in m else None for k in ("ace_cf", "ace_full", "uce", "esd_x")}
            ratio = (f"{sec['esd_x'] / sec['ace_full']:.2f}×" if sec["esd_x"] is not None and sec["ace_full"] else "–")
            acc = [_pct(m[k]["metrics"]["acc_e"]) if k in m else "–" for k in ("ace_full", "esd_x")]
            rows.append([_display(e["label"], e), *[_secs(sec[k]) for k in sec], ratio, *acc])
        lines += _table(["erasure", "ACE closed form s", "ACE full s", "UCE s", "ESD-x s", "ESD-x ÷ ACE full",
                         "Acc_e ACE full", "Acc_e ESD-x"], rows)
        lines += ["", f"![fit seconds per method]({image_dir}/{PLOTS['fit_seconds']})", ""]
    return lines


def inference_markdown(result: dict[str, Any], image_dir: str = "images") -> list[str]:
    inf = result["sections"]["inference"]
    lines = ["## 3. Inference overhead", "", f"Measured in {inf['seconds']:.0f} s.", ""]
    over = inf.get("overhead")
    if over:
        lines += [f"One denoising step of an {over.get('model', 'SD1.5-shaped UNet')}, latent {over['latent']}×"
                  f"{over['latent']}, batch 2 (classifier-free guidance), {over['threads']} threads; the configurations "
                  f"are timed interleaved, {over['rounds']} rounds, medians compared. `ACE n`: an adapter of the rank "
                  "`erase_concept` fits for n concepts, applied by the gated processor; `fused`: an adapter fused into "
                  "the K/V weights (`fuse_adapter`) and unloaded, so stock processors run on edited weights of the "
                  "stock shapes — the same cost whatever the number of concepts fused.", ""]
        lines += _table(["configuration", "median s/step", "÷ stock"],
                        [[k, _num(v, 4), f"{over['ratio_vs_stock'][k]:.3f}×"] for k, v in over["median_seconds"].items()])
        lines += ["", f"![overhead vs concepts]({image_dir}/{PLOTS['overhead']})", ""]
    lines += ["## 4. Adapter size", "",
              "Parameters of an adapter of `erase_concept`'s default rank (K and V factors and the gate of every "
              "cross-attention layer); bytes at fp16.", ""]
    lines += _table(["model", "layers", "concepts", "rank", "parameters", "MB (fp16)", "KB per concept"],
                    [[r["model"], str(r["layers"]), str(r["concepts"]), str(r["rank"]), f"{r['parameters']:,}",
                      _num(r["mb_fp16"], 2), _num(r["kb_fp16_per_concept"], 1)] for r in inf["sizes"]])
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
        "[miniature world](miniature_world.md); costs at real model shapes use random weights (costs are real, "
        "outputs are not). Real SD/SDXL checkpoints need a GPU and Hub access and were not measured here.",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- total time: {result['seconds']:.0f} s" + (f" (finished {result['date']})" if result.get("date") else ""),
        "- full benchmark: `ace-diffusers bench` (the quick one, `--quick`, uses fewer shapes, images and steps)",
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


# ---------------------------------------------------------------------- plots
def _figure(width: float, height: float = 4.0) -> Any:
    # matplotlib is optional (the bench/test extras): only figures need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # optional, as above

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], fmt: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (method, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [0.0 if v is None else v for v in values], width=width, label=METHODS.get(method, method),
                      color=_COLOURS.get(method))
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)


def _finish_rate_plot(fig: Any, ax: Any, target: float, target_label: str, ylabel: str, title: str) -> bytes:
    """Target line, 0..1 axis, labels and legend of a bar plot of rates; the PNG bytes."""
    ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=target_label)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_below(ax)
    return _png(fig)


def _legend_below(ax: Any) -> None:
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def plot_h(result: dict[str, Any]) -> bytes:
    erasures = _erasures(result)
    methods = _method_keys(result)
    fig = _figure(max(6.0, 1.6 * len(erasures) + 2))
    ax = fig.subplots()
    series = {m: [e["methods"][m]["metrics"]["h"] if m in e["methods"] else None for e in erasures] for m in methods}
    _grouped_bars(ax, [_display(e["label"], e) for e in erasures], series, "{:.2f}")
    return _finish_rate_plot(fig, ax, TARGET_H, f"target {TARGET_H:.2f}", "H (higher is better)",
                             "MACE's H per erasure and method (miniature world)")


def plot_asr(result: dict[str, Any]) -> bytes:
    methods = _method_keys(result)
    fig = _figure(8.0)
    ax = fig.subplots()
    pooled = {m: pooled_asr(result, m) for m in methods}
    series = {m: [pooled[m].get(a, {}).get("asr") for a in ATTACK_NAMES] for m in methods}
    _grouped_bars(ax, [n.replace(" ", "\n", 1) for n in ATTACK_NAMES.values()], series, "{:.2f}")
    return _finish_rate_plot(fig, ax, TARGET_ASR, f"target ≤ {TARGET_ASR:.2f}", "ASR (lower is better)",
                             "Attack success rate per attack (all erasures pooled)")


def plot_fit_seconds(result: dict[str, Any]) -> bytes:
    erasures = _erasures(result)
    methods = [m for m in _method_keys(result) if m != "base"]
    fig = _figure(max(6.0, 1.6 * len(erasures) + 2))
    ax = fig.subplots()
    series = {m: [e["methods"][m]["seconds"] if m in e["methods"] else None for e in erasures] for m in methods}
    _grouped_bars(ax, [_display(e["label"], e) for e in erasures], series, "{:.3g}")
    ax.set_yscale("log")
    ax.set_ylabel("fit seconds (log scale)")
    ax.set_title("Fit time per erasure and method (this machine)", fontsize=10)
    _legend_below(ax)
    return _png(fig)


def plot_overhead(result: dict[str, Any]) -> bytes:
    over = result["sections"]["inference"]["overhead"]
    ratios = over["ratio_vs_stock"]
    ace = sorted((int(k.split()[1]), v) for k, v in ratios.items() if k.startswith("ACE "))
    fig = _figure(6.5, 4.4)
    ax = fig.subplots()
    ax.plot([n for n, _ in ace], [v for _, v in ace], marker="o", color=_COLOURS["ace_full"], label="ACE (gated processor)")
    if "fused" in ratios:
        ns = [n for n, _ in ace]
        ax.plot(ns, [ratios["fused"]] * len(ns), marker="s", linestyle="none", color="#d62728",
                label="fused into the weights (stock processors; same cost for any n)")
    ax.axhline(1.0, color="#9e9e9e", linewidth=0.8, label="stock")
    ax.axhline(TARGET_OVERHEAD_1, color="black", linestyle=":", linewidth=0.8, label=f"target 1 concept ≤ {TARGET_OVERHEAD_1}")
    ax.axhline(TARGET_OVERHEAD_100, color="black", linestyle="--", linewidth=0.8,
               label=f"target 100 concepts ≤ {TARGET_OVERHEAD_100}")
    ax.set_xscale("log")
    ns = [n for n, _ in ace]
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("concepts in the adapter")
    ax.set_ylabel("step time ÷ stock")
    values = list(ratios.values()) + [TARGET_OVERHEAD_100]
    ax.set_ylim(min(0.95, min(values) - 0.02), max(values) + 0.03)
    ax.set_title(f"Denoising-step overhead, SD1.5-shaped UNet, latent {over['latent']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _png(fig)


def plots(result: dict[str, Any]) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` for the sections present in ``result``."""
    out = {}
    sections = result.get("sections", {})
    if sections.get("efficacy"):
        out[PLOTS["h"]] = plot_h(result)
        out[PLOTS["asr"]] = plot_asr(result)
        out[PLOTS["fit_seconds"]] = plot_fit_seconds(result)
    if (sections.get("inference") or {}).get("overhead"):
        out[PLOTS["overhead"]] = plot_overhead(result)
    return out


def write(result: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write ``output`` (Markdown), ``benchmarks.json`` beside it and the plots in ``images/``, atomically."""

    output = Path(output)
    paths: dict[str, Path] = {}
    for name, data in plots(result).items():
        paths[name] = atomic_write_bytes(output.parent / "images" / name, data)
    paths["json"] = atomic_write_json(output.with_suffix(".json"), result)
    paths["markdown"] = atomic_write_text(output, markdown(result, "images", paths["json"].name))
    return paths
