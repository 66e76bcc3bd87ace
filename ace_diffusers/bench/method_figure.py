"""``ace-diffusers figures``: regenerate ``docs/images/method.png``, the figure of "How ACE works".

The figure is computed, never drawn by hand: it erases a concept from the bundled miniature world
with :func:`ace_diffusers.erase_concept` (the same arguments as the demo) and plots, per text token of
a few prompts, the gate ``g(c)`` and the relative change of the cross-attention keys, read from the
loaded adapter's buffers through the processor's own ``gate``/``deltas`` code. The fit has no
randomness except the closed form's fixed-seed range finder, so the figure is reproducible.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import helptext
from .._io import atomic_write_bytes
from ..core.processor import get_stack
from ..fitting.erase import erase_concept
from ..fitting.text import TextEmbedder
from ..integration import attach
from ..integration.modules import get_unet
from ..shapes.erasure import concept_kind, erase_arguments
from ..shapes.pipeline import load_shapes_pipeline
from ..shapes.vocab import SHAPE_WORDS, STYLE_WORDS

DEFAULT_OUTPUT = Path("docs") / "images" / "method.png"
DEFAULT_CONCEPT = "circle"
# The erased word, a held-out synonym, a preserved shape, and the empty prompt that classifier-free
# guidance runs alongside every prompt.
DEFAULT_PROMPTS = ("a red circle", "a green disc", "a blue square", "")
PAD_LABEL = "[PAD]"


@dataclass
class PromptTokens:
    """Per-token numbers of one prompt; padding positions are averaged into the last entry."""

    prompt: str
    role: str
    tokens: list[str]
    gate: list[float]  # g(c), mean over layers (the closed form shares one gate)
    change_gated: list[float]  # ||ΔK|| / ||K|| over all layers, as the processor applies it
    change_ungated: list[float]  # the same factors with the gate forced to 1


@dataclass
class MethodFigureData:
    """Everything the figure shows, so tests can check the claims the caption makes."""

    concept: str
    neutral: str
    rank: int
    layers: int
    shared_gate: bool  # every layer carries the same gate (true after the closed form)
    stats: dict[str, float]
    rows: list[PromptTokens]


def prompt_role(prompt: str, concept: str, mined: tuple[str, ...] | list[str] = ()) -> str:
    """What a prompt is relative to the erased miniature-world concept (for the panel title); ``mined``:
    the words the fit mined from the model."""

    words = SHAPE_WORDS if concept in SHAPE_WORDS else STYLE_WORDS
    padded = f" {prompt.lower()} "
    if not prompt.strip():
        return "empty prompt (guidance)"
    if f" {concept} " in padded:
        return "erased word"
    if any(f" {w} " in padded for w in mined):
        return "synonym mined from the model"
    if any(f" {w} " in padded for w in words[concept][1:]):
        return "held-out synonym"
    if any(f" {w} " in padded for other, ws in words.items() if other != concept for w in ws):
        return "another concept (preserved)"
    return "other prompt"


@torch.no_grad()
def method_figure_data(pipe: Any, adapter_name: str, concept: str, prompts: list[str]) -> MethodFigureData:
    """Per-token gate and K change of the loaded adapter ``adapter_name`` on ``prompts``."""

    unet = get_unet(pipe)
    adapter = attach.loaded_adapters(unet)[adapter_name]
    mined = adapter.fit.get("mined_neighbours", {}).get(concept, [])
    embedder = TextEmbedder(pipe)
    tokenizer = embedder.encoders[0][0]
    encoded = embedder.encode(list(prompts), extra_pad_tokens=None)  # every position the UNet reads
    modules = attach.cross_attention_modules(unet)
    rows = []
    for prompt, enc in zip(prompts, encoded, strict=True):
        ids = tokenizer(prompt, padding="max_length", max_length=embedder.max_length, truncation=True)
        ids = ids["input_ids"]
        labels = tokenizer.convert_ids_to_tokens(ids)[: enc.embeddings.shape[0]]
        gates, base_sq, gated_sq, ungated_sq = [], 0.0, 0.0, 0.0
        for name in sorted(modules):
            attn = modules[name]
            stack = get_stack(attn)
            delta = stack.adapters[adapter_name]
            context = enc.embeddings[None].to(device=delta.k_down.device, dtype=delta.k_down.dtype)
            key = attn.to_k(context)[0]
            # what ACEAttnProcessor adds to K
            gated, _ = delta.deltas(context, delta.multiplier(stack.enabled))
            ungated = delta.low_rank(context, "k")[0] * delta.scale  # the same factors, gate forced to 1
            gates.append(delta.gate(context)[0, :])
            base_sq = base_sq + key.pow(2).sum(-1)
            gated_sq = gated_sq + gated[0].pow(2).sum(-1)
            ungated_sq = ungated_sq + ungated.pow(2).sum(-1)
        gate = torch.stack(gates).mean(0)
        gated_change = (gated_sq / base_sq).sqrt()
        ungated_change = (ungated_sq / base_sq).sqrt()
        rows.append(_collapse_padding(prompt, prompt_role(prompt, concept, mined), labels, enc.length, gate,
                                      gated_change, ungated_change))
    stats = {k: float(v) for k, v in adapter.fit.get("stats", {}).items() if k.startswith("gate_")}
    first = adapter.layers[sorted(modules)[0]]
    shared = all(
        torch.equal(f.gate_weight, first.gate_weight) and torch.equal(f.gate_bias, first.gate_bias)
        for f in adapter.layers.values()
    )
    return MethodFigureData(concept, adapter.neutral[0], adapter.rank, len(modules), shared, stats, rows)


def _collapse_padding(
    prompt: str, role: str, labels: list[str], length: int, *series: torch.Tensor
) -> PromptTokens:
    """Keep the real tokens, average the padding positions into one bar (they are identical in role)."""
    n_pad = len(labels) - length
    tokens = labels[:length] + ([f"{PAD_LABEL}×{n_pad}"] if n_pad > 0 else [])
    values = []
    for s in series:
        s = s.float().cpu()
        values.append(s[:length].tolist() + ([float(s[length:].mean())] if n_pad > 0 else []))
    return PromptTokens(prompt, role, tokens, *values)


def _draw_header(fig: Any, grid: Any, data: MethodFigureData) -> Any:
    """The top row: the formula, and what was erased with which rank and gate; returns its axes."""
    header = fig.add_subplot(grid[0, :])
    header.axis("off")
    # the notation of docs/method.md and core/factors.py: c is one text token's embedding
    header.text(0.0, 0.98, r"$k = W_k\,c + s\;g(c)\;B_k A_k\,c \qquad v = W_v\,c + s\;g(c)\;B_v A_v\,c"
                r"\qquad g(c) = \sigma(w \cdot c + b)$", fontsize=13, va="top", transform=header.transAxes)
    neutral = f"'{data.neutral}'" if data.neutral else "'' (no shape word)"
    facts = (f"Miniature world, erase_concept('{data.concept}') → {neutral}: rank r = {data.rank} on K and V "
             f"of {data.layers} cross-attention layers, "
             + ("one gate g shared by all of them." if data.shared_gate
                else "a gate per layer (averaged here)."))
    if data.stats:
        facts += (f"  Gate on the fit's tokens: open (>0.5) on "
                  f"{100 * data.stats['gate_concept_tokens_open']:.0f} % of concept-carrying tokens, "
                  f"{100 * data.stats['gate_other_tokens_open']:.1f} % of the others.")
    header.text(0.0, 0.42, facts, fontsize=9, va="top", transform=header.transAxes, wrap=True)
    return header


def _draw_prompt(fig: Any, grid: Any, col: int, row: PromptTokens, top_max: float, header: Any) -> None:
    """Column ``col``: the gate per token of one prompt above, the relative K change below."""
    xs = list(range(len(row.tokens)))
    ax_gate = fig.add_subplot(grid[1, col])
    ax_gate.bar(xs, row.gate, color="#d62728", width=0.7)
    ax_gate.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax_gate.set_ylim(0, 1.05)
    ax_gate.set_xticks(xs)
    ax_gate.set_xticklabels([])
    title = f'"{row.prompt}"' if row.prompt else '""'
    ax_gate.set_title(f"{title}\n{row.role}", fontsize=9)
    if max(row.gate) < 0.1:  # bars too small to see: say how closed the gate is
        ax_gate.text(0.5, 0.7, f"gate closed: max g = {max(row.gate):.2g}", ha="center", fontsize=8,
                     transform=ax_gate.transAxes)
    ax_change = fig.add_subplot(grid[2, col])
    width = 0.38
    ax_change.bar([x - width / 2 for x in xs], row.change_ungated, width, color="#bdbdbd",
                  label="same factors, gate forced to 1 (ungated edit)")
    ax_change.bar([x + width / 2 for x in xs], row.change_gated, width, color="#1f77b4",
                  label="ACE: gated edit, as the processor applies it")
    ax_change.set_ylim(0, top_max)
    if max(row.change_gated) < 0.02 * top_max:  # invisible bars: print the largest gated change
        ax_change.text(0.5, 0.7, f"gated: max ||ΔK||/||K|| = {max(row.change_gated):.2g}", ha="center",
                       fontsize=8, color="#1f77b4", transform=ax_change.transAxes)
    ax_change.set_xticks(xs)
    ax_change.set_xticklabels(row.tokens, rotation=50, ha="right", fontsize=8)
    if col == 0:
        ax_gate.set_ylabel("gate g(c)", fontsize=9)
        ax_change.set_ylabel("relative change of K\n||ΔK|| / ||K||, all layers", fontsize=9)
        handles, labels = ax_change.get_legend_handles_labels()
        header.legend(handles, labels, fontsize=8.5, loc="upper right", frameon=False)
    else:
        ax_gate.set_yticklabels([])
        ax_change.set_yticklabels([])
    for ax in (ax_gate, ax_change):
        ax.tick_params(labelsize=8)


def render_method_figure(data: MethodFigureData) -> bytes:
    """The figure as PNG bytes (matplotlib, Agg; no timestamp or version metadata, so reruns match)."""
    # matplotlib is optional (the bench/test extras): only figures need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # optional, as above

    n = len(data.rows)
    fig = Figure(figsize=(3.0 * n + 0.6, 6.6), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, n, height_ratios=[0.62, 1.0, 1.15], hspace=0.28, wspace=0.12,
                            left=0.07, right=0.99, top=0.98, bottom=0.13)
    header = _draw_header(fig, grid, data)
    top_max = max(max(r.change_ungated + r.change_gated) for r in data.rows) * 1.12
    for col, row in enumerate(data.rows):
        _draw_prompt(fig, grid, col, row, top_max, header)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_method_figure(output: str | os.PathLike, concept: str = DEFAULT_CONCEPT,
                        prompts: list[str] | None = None) -> MethodFigureData:
    """Load the miniature world, erase ``concept`` as the demo does, and write the figure atomically."""

    pipe = load_shapes_pipeline()
    erase_concept(pipe, **erase_arguments(concept), adapter_name="figure")
    data = method_figure_data(pipe, "figure", concept, list(DEFAULT_PROMPTS if prompts is None else prompts))

    atomic_write_bytes(output, render_method_figure(data))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("figures", __doc__, first_paragraph=True)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="PNG to write (default: %(default)s)")
    parser.add_argument("--concept", default=DEFAULT_CONCEPT,
                        help="miniature-world shape or fill style to erase")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"prompt to show (repeatable; default: {list(DEFAULT_PROMPTS)})")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        concept_kind(args.concept)
    except ValueError as err:
        parser.error(str(err))
    data = write_method_figure(args.output, args.concept, args.prompt)
    for row in data.rows:
        gates = " ".join(f"{t}={g:.2f}" for t, g in zip(row.tokens, row.gate, strict=True))
        print(f"{row.prompt!r:<18} {row.role:<28} gate: {gates}")
    print(f"wrote {args.output}")
    return 0
