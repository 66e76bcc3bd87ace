"""The benchmark page's plots (matplotlib, Agg): H and fit seconds per erasure and method, ASR per attack,
and the inference overhead against the number of concepts. Pure functions of the result dict, like
:mod:`.report`, which links them.
"""

from __future__ import annotations

import io
from typing import Any

from .efficacy_plans import ATTACK_NAMES, METHODS
from .results import (
    TARGET_ASR,
    TARGET_H,
    TARGET_OVERHEAD_1,
    TARGET_OVERHEAD_100,
    display_label,
    erasures_of,
    method_keys,
    pooled_asr,
)

PLOTS = {
    "h": "bench_h.png",
    "asr": "bench_asr.png",
    "fit_seconds": "bench_fit_seconds.png",
    "overhead": "bench_overhead.png",
}
_COLOURS = {
    "base": "#9e9e9e", "ace_cf": "#9ecae1", "ace_full": "#1f77b4", "uce": "#ff7f0e", "esd_x": "#2ca02c",
}


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
        bars = ax.bar(xs, [0.0 if v is None else v for v in values], width=width,
                      label=METHODS.get(method, method), color=_COLOURS.get(method))
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
    erasures = erasures_of(result)
    methods = method_keys(result)
    fig = _figure(max(6.0, 1.6 * len(erasures) + 2))
    ax = fig.subplots()
    series = {
        m: [e["methods"][m]["metrics"]["h"] if m in e["methods"] else None for e in erasures] for m in methods
    }
    _grouped_bars(ax, [display_label(e["label"], e) for e in erasures], series, "{:.2f}")
    return _finish_rate_plot(fig, ax, TARGET_H, f"target {TARGET_H:.2f}", "H (higher is better)",
                             "MACE's H per erasure and method (miniature world)")


def plot_asr(result: dict[str, Any]) -> bytes:
    methods = method_keys(result)
    fig = _figure(8.0)
    ax = fig.subplots()
    pooled = {m: pooled_asr(result, m) for m in methods}
    series = {m: [pooled[m].get(a, {}).get("asr") for a in ATTACK_NAMES] for m in methods}
    _grouped_bars(ax, [n.replace(" ", "\n", 1) for n in ATTACK_NAMES.values()], series, "{:.2f}")
    return _finish_rate_plot(fig, ax, TARGET_ASR, f"target ≤ {TARGET_ASR:.2f}", "ASR (lower is better)",
                             "Attack success rate per attack (all erasures pooled)")


def plot_fit_seconds(result: dict[str, Any]) -> bytes:
    erasures = erasures_of(result)
    methods = [m for m in method_keys(result) if m != "base"]
    fig = _figure(max(6.0, 1.6 * len(erasures) + 2))
    ax = fig.subplots()
    series = {
        m: [e["methods"][m]["seconds"] if m in e["methods"] else None for e in erasures] for m in methods
    }
    _grouped_bars(ax, [display_label(e["label"], e) for e in erasures], series, "{:.3g}")
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
    ax.plot([n for n, _ in ace], [v for _, v in ace], marker="o", color=_COLOURS["ace_full"],
            label="ACE (gated processor)")
    if "fused" in ratios:
        ns = [n for n, _ in ace]
        ax.plot(ns, [ratios["fused"]] * len(ns), marker="s", linestyle="none", color="#d62728",
                label="fused into the weights (stock processors; same cost for any n)")
    ax.axhline(1.0, color="#9e9e9e", linewidth=0.8, label="stock")
    ax.axhline(TARGET_OVERHEAD_1, color="black", linestyle=":", linewidth=0.8,
               label=f"target 1 concept ≤ {TARGET_OVERHEAD_1}")
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
