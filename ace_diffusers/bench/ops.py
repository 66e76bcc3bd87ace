"""Tensor operations per cross-attention call: stock diffusers vs ACE with 1, 2 and 10 adapters.

On a GPU every tensor operation is at least one kernel launch, so the number of operations a call runs
matters there even where CPU timings cannot tell it apart. One SD1.5-shaped cross-attention layer (the
first down block's: 320 channels, 8 heads, text width 768; ``latent²`` queries, batch 2) is run once
under ``torch.profiler``; the table counts

* **top-level** operations: the ``aten::`` calls the processor itself makes (what it launches), and
* **all** ``aten::`` events, the operations those expand into as well (views, reshapes, ``mm``).

The ACE adapters are random, of ``erase_concept``'s rank for one concept each; the target (issue:
zero-cost inference) is at most 12 added top-level operations, the same for any number of adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..fitting.solvers import default_rank
from ..integration.attach import attach_adapter
from ..testing import random_adapter

ADAPTER_COUNTS = (1, 2, 10)
MAX_ADDED_OPS = 12
CHANNELS, HEADS, TEXT_WIDTH, TEXT_TOKENS = 320, 8, 768, 77


def count_ops(attn: Attention, hidden: torch.Tensor, context: torch.Tensor) -> tuple[int, int]:
    """``(top-level, all)`` ``aten::`` operations of one ``attn(hidden, context)`` call (after a warm-up)."""
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=context)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attn(hidden, encoder_hidden_states=context)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(events)


def op_counts(latent: int = 64, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Operation counts of stock attention and of ACE with each of :data:`ADAPTER_COUNTS` adapters, attached
    the way pipelines attach them (:func:`~ace_diffusers.integration.attach.attach_adapter`)."""
    generator = torch.Generator().manual_seed(seed)
    holder = nn.Module()  # one cross-attention layer is all the "UNet" there is
    holder.attn2 = Attention(
        CHANNELS, cross_attention_dim=TEXT_WIDTH, heads=HEADS, dim_head=CHANNELS // HEADS
    )
    holder.to(device).eval()
    hidden = torch.randn(2, latent * latent, CHANNELS, generator=generator).to(device)
    context = torch.randn(2, TEXT_TOKENS, TEXT_WIDTH, generator=generator).to(device)
    rows = {"stock": count_ops(holder.attn2, hidden, context)}
    attached = 0
    for count in ADAPTER_COUNTS:
        for i in range(attached, count):
            adapter = random_adapter(holder, rank=default_rank(1, TEXT_WIDTH), seed=seed + i)
            attach_adapter(holder, adapter, f"a{i}")
        attached = count
        rows[f"ACE, {count} adapter{'s' if count > 1 else ''}"] = count_ops(holder.attn2, hidden, context)
    stock_top, stock_all = rows["stock"]
    return {
        "latent": latent,
        "device": device,
        "rows": [
            {"configuration": k, "top_level": top, "all": every, "added_top_level": top - stock_top,
             "added_all": every - stock_all}
            for k, (top, every) in rows.items()
        ],
    }


def format_ops(result: dict[str, Any]) -> str:
    lines = [f"# operations per cross-attention call (SD1.5 first-block layer, latent {result['latent']}x"
             f"{result['latent']}, {result['device']})",
             f"{'configuration':<18}{'top-level':>10}{'added':>7}{'all aten':>10}{'added':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['configuration']:<18}{r['top_level']:>10}{r['added_top_level']:>7}{r['all']:>10}"
                     f"{r['added_all']:>7}")
    target, measured, met = ops_target(result)
    lines.append(f"target: {target}: {'met' if met else 'NOT MET'} ({measured})")
    return "\n".join(lines)


def ops_target(result: dict[str, Any]) -> tuple[str, str, bool]:
    """``(target, measured, met)``: at most :data:`MAX_ADDED_OPS` added top-level operations per call, the
    same for any number of adapters beyond one."""
    added = [r["added_top_level"] for r in result["rows"][1:]]
    return (f"ACE adds ≤ {MAX_ADDED_OPS} operations per cross-attention call, for any number of adapters",
            "added: " + ", ".join(f"{r['configuration'].removeprefix('ACE, ')} {r['added_top_level']}"
                                  for r in result["rows"][1:]),
            max(added) <= MAX_ADDED_OPS and len(set(added[1:])) <= 1)


def ops_markdown(result: dict[str, Any] | None) -> list[str]:
    """The operation counts as a Markdown paragraph and table (nothing when not measured)."""
    if not result:
        return []
    head = ("Operations per cross-attention call (`ace_diffusers/bench/ops.py`: the first down block's "
            f"layer, latent {result['latent']}×{result['latent']}, torch profiler): top-level operations are "
            "the calls the processor makes, *all* counts what they expand into.")
    lines = [head, "", "| configuration | top-level | added | all aten | added |", "|---|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['top_level']} | {r['added_top_level']} | {r['all']} | "
              f"{r['added_all']} |" for r in result["rows"]]
    return lines + [""]
