"""Measurements shared by the fitting tests: how much of the concept's K/V gap an edit leaves, how much it
changes other prompts, how open the gate is."""

from __future__ import annotations

import torch

from ace_diffusers.core.processor import get_stack
from ace_diffusers.fitting.data import FitSettings, align_tokens
from ace_diffusers.fitting.presets import fill_template
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.integration.modules import cross_attention_modules

# Tolerances reached on tiny random-weight pipelines with 256-d text tokens (docs/method.md says what
# they measure). A random 2-layer text encoder has no semantics, so generalisation to unseen
# templates/synonyms is measured on the miniature world instead (real pretrained text encoder).
TEXT_DIM = 256
CONCEPT_GAP_LEFT = 0.35  # sqrt(sum ||K_edit(c) - K(n)||^2 / sum ||K(c) - K(n)||^2) over layers, K and V
PRESERVE_CHANGE = 0.03  # sqrt(sum ||K_edit(p) - K(p)||^2 / sum ||K(p)||^2) on preservation prompts
UNRELATED_GATE = 0.05  # max gate value on any token of an unrelated prompt
# The core map: no mined neighbours and no paired prompts. In a random encoder those are random words and
# contexts that share the edit's capacity with the concept (test_neighbours and test_data cover them; the
# miniature world measures what they bring).
CORE = FitSettings(neighbours=0, context_prompts=0)


def keys_values(attn, context):
    """K and V exactly as the ACE processor computes them (base projection + loaded deltas)."""
    key, value = attn.to_k(context), attn.to_v(context)
    stack = get_stack(attn)
    if stack is not None and len(stack.adapters):
        key, value = stack.add_delta(context, key, value)
    return key, value


def encode(pipe, template, phrase):
    prompt, span = fill_template(template, phrase)
    return TextEmbedder(pipe).encode([prompt], [span], extra_pad_tokens=None)[0]


def concept_gap_left(pipe, template, concept, neutral):
    """Fraction of the concept->neutral K/V gap that remains after the edit, over all layers."""
    c_enc, n_enc = encode(pipe, template, concept), encode(pipe, template, neutral)
    pairs = [(i, j) for i, j in align_tokens(c_enc, n_enc) if i >= c_enc.span[0]]
    ci, nj = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    left, gap = 0.0, 0.0
    with torch.no_grad():
        for attn in cross_attention_modules(pipe.unet).values():
            k_edit, v_edit = keys_values(attn, c_enc.embeddings[ci])
            k_n, v_n = attn.to_k(n_enc.embeddings[nj]), attn.to_v(n_enc.embeddings[nj])
            k_c, v_c = attn.to_k(c_enc.embeddings[ci]), attn.to_v(c_enc.embeddings[ci])
            left += (k_edit - k_n).norm() ** 2 + (v_edit - v_n).norm() ** 2
            gap += (k_c - k_n).norm() ** 2 + (v_c - v_n).norm() ** 2
    return float((left / gap).sqrt())


def relative_change(pipe, prompt):
    enc = TextEmbedder(pipe).encode([prompt], extra_pad_tokens=None)[0].embeddings
    change, norm = 0.0, 0.0
    with torch.no_grad():
        for attn in cross_attention_modules(pipe.unet).values():
            k_edit, v_edit = keys_values(attn, enc)
            k, v = attn.to_k(enc), attn.to_v(enc)
            change += (k_edit - k).norm() ** 2 + (v_edit - v).norm() ** 2
            norm += k.norm() ** 2 + v.norm() ** 2
    return float((change / norm).sqrt())


def max_gate(pipe, prompt):
    enc = TextEmbedder(pipe).encode([prompt], extra_pad_tokens=None)[0].embeddings
    gates = [
        delta.gate(enc.unsqueeze(0)).max()
        for attn in cross_attention_modules(pipe.unet).values()
        for delta in get_stack(attn).adapters.values()
    ]
    return float(max(gates))
