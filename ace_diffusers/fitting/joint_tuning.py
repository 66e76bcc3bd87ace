"""``ACETrainer``'s second stage on joint attention (SD3 / SD3.5, FLUX): fine-tuning block by block.

The closed form (:mod:`.joint`) fits each block on that block's own text stream. The fine-tuning refines
every block's factors and gate with the trainer's objective — the attention output of real image queries
— computed per block, without running the transformer during training:

In a joint block the image queries attend over the image tokens' keys and the text tokens' keys together.
The image tokens are never edited, so for one query ``q`` (one head, scale ``s``) their whole part is two
fixed quantities,

    m(q) = log Σ_i exp(s q·k_i),        o(q) = Σ_i softmax_i(s q·k_i) v_i           (image tokens i)

and attention over ``[image; text]`` equals attention over ``[one virtual token; text]`` whose logit is
``m(q)`` and whose value is ``o(q)``:

    Attn(q; c) = (e^{m(q)} o(q) + Σ_t e^{s q·k_t} v_t) / (e^{m(q)} + Σ_t e^{s q·k_t})

where ``k_t``/``v_t`` are the text rows' keys and values as the block makes them: its projection, plus
the gated delta (:meth:`~ace_diffusers.core.factors.GatedLowRank.deltas`, the processors' formula), its
key norm and (FLUX) its rotary embedding of the text positions. :func:`capture_image_queries` records
``q``, ``m`` and ``o`` of a sample of image tokens per block and timestep, from the transformer run on the
anchor prompts; the text rows each block receives come from :meth:`.joint.BlockStreams.capture`.

Per block the loss is ``||Attn_edited(c(P)) − Attn(c(P_n))||² / ||Attn(c(P_n))||²`` for a prompt to erase
``P`` and its anchor prompt ``P_n`` (the same noise and timestep), and the same with ``P`` itself as the
target for prompts to keep; the loss is the mean over blocks, the keep part weighted by
``preserve_weight``. As in the closed form, each block is trained on the *unedited* streams of the blocks
before it.

**Stream-space adversaries.** Where the UNet trainer moves the concept's input embeddings, here the
concept's own rows of every block's text stream are moved, within a ball of ``adversarial_radius`` times
each row's norm, to where the *edited* block's output stays closest to the *unedited* output on the
concept (a few Adam steps); the moved rows join the prompts to erase, with the anchor's target.

Not here: mined synonyms (the miner reads one CLIP encoder's tokens), the phrase search and the
concept-vector defence (both model a single text encoder's output); the trainer refuses the last two.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from tqdm.auto import tqdm

from ..core.factors import LayerFactors
from ..core.flux import is_single_stream
from ..format import TENSOR_KEYS
from ..integration.modules import kv_projections, projection_weight
from .data import FitSettings, fit_jobs
from .joint import BlockStreams, block_streams, phrase_rows
from .presets import filled, normalize_prompt

QUERY_PROMPTS = 4  # anchor prompts the image queries are captured with


@dataclass
class JointBlock:
    """One joint attention and a bank of its image queries with their image part (module docstring)."""

    name: str
    attn: nn.Module
    queries: torch.Tensor  # (timesteps, Q, heads, head_dim), normed and rotated as the block does
    image_logit: torch.Tensor  # (timesteps, Q, heads): m(q)
    image_value: torch.Tensor  # (timesteps, Q, heads, head_dim): o(q)
    text_rotary: tuple[torch.Tensor, torch.Tensor] | None  # FLUX: (cos, sin) of the text positions


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1))


def _image_part(attn: nn.Module, kwargs: dict, text_length: int) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values (B, N, heads, head_dim) of the image tokens a block's attention receives,
    as its processor makes them, and the text positions' rotary embedding (FLUX) or None."""
    hidden = kwargs["hidden_states"]
    if is_single_stream(attn):  # [text; image] through one set of projections
        hidden = hidden[:, text_length:]
    q, k, v = (_heads(attn, proj(hidden)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    rotary = kwargs.get("image_rotary_emb")
    text_rotary = None
    if rotary is not None:  # FLUX: positions are [text; image]
        cos, sin = rotary
        image = (cos[text_length:], sin[text_length:])
        q, k = (apply_rotary_emb(t, image, sequence_dim=1) for t in (q, k))
        text_rotary = (cos[:text_length].float().cpu(), sin[:text_length].float().cpu())
    return q.float(), k.float(), v.float(), text_rotary


@torch.no_grad()
def capture_image_queries(
    streams: BlockStreams, prompts: list[str], *, per_block: int | None, seed: int
) -> list[JointBlock]:
    """Every joint block's image queries with their image part ``m``, ``o``, from the transformer run on
    ``prompts`` at each capture timestep; ``per_block``: queries kept per block and timestep (a seeded
    sample, spread over the prompts; None: all)."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {name: [] for name in streams.modules}
    rotary: dict[str, Any] = {}

    def record(name: str, kwargs: dict, text_length: int) -> None:
        attn = streams.modules[name]
        q, k, v, rotary[name] = _image_part(attn, kwargs, text_length)
        scale = q.shape[-1] ** -0.5
        for b in range(len(q)):
            pick = torch.arange(q.shape[1])  # None: every image token, in order
            if per_block is not None:
                pick = torch.randperm(q.shape[1], generator=generator)[: max(1, per_block // len(prompts))]
            pick = pick.to(q.device)
            logits = torch.einsum("qhd,nhd->qhn", q[b, pick], k[b]) * scale
            value = torch.einsum("qhn,nhd->qhd", logits.softmax(-1), v[b])
            parts[name].append((q[b, pick].cpu(), logits.logsumexp(-1).cpu(), value.cpu()))

    streams.run(prompts, record)
    blocks = []
    for name, recorded in parts.items():
        steps = len(recorded) // len(prompts)  # one record per prompt and timestep, timestep-major
        q, m, o = (
            torch.stack(
                [
                    torch.cat([r[i] for r in recorded[s * len(prompts) : (s + 1) * len(prompts)]])
                    for s in range(steps)
                ]
            )
            for i in range(3)
        )
        blocks.append(JointBlock(name, streams.modules[name], q, m, o, rotary[name]))
    return blocks


def joint_output(block: JointBlock, rows: torch.Tensor, factors: LayerFactors | None) -> torch.Tensor:
    """The block's attention output for its image queries over text rows ``rows`` (timesteps, B, T, d),
    edited by ``factors`` (None: unedited): (timesteps, B, Q, heads * head_dim)."""
    attn = block.attn
    proj_k, proj_v = kv_projections(attn)
    key, value = (
        F.linear(
            rows, projection_weight(p).detach().float(), None if p.bias is None else p.bias.detach().float()
        )
        for p in (proj_k, proj_v)
    )
    if factors is not None:
        delta_k, delta_v = factors.deltas(rows)
        key, value = key + delta_k, value + delta_v
    key, value = _heads(attn, key), _heads(attn, value)
    norm = attn.norm_k if is_single_stream(attn) else getattr(attn, "norm_added_k", None)
    if norm is not None:  # in the norm's own precision, as the block runs it
        weight = getattr(norm, "weight", None)
        key = norm(key if weight is None else key.to(weight.dtype)).float()
    if block.text_rotary is not None:
        flat = key.flatten(0, 1)
        key = apply_rotary_emb(flat, block.text_rotary, sequence_dim=1).reshape(key.shape)
    query = block.queries.to(rows.device)
    logits = torch.einsum("sqhd,sbthd->sbqht", query, key) * query.shape[-1] ** -0.5
    image = block.image_logit.to(rows.device)[:, None, :, :, None].expand(*logits.shape[:-1], 1)
    weights = torch.cat([image, logits], dim=-1).softmax(-1)
    out = weights[..., :1] * block.image_value.to(rows.device)[:, None]
    out = out + torch.einsum("sbqht,sbthd->sbqhd", weights[..., 1:], value)
    return out.flatten(-2)


def _relative(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return ((got - want) ** 2).mean() / want.pow(2).mean().clamp_min(1e-8)


@dataclass
class JointData:
    """Per block: text rows of the prompts to erase and their targets, of the prompts to keep and theirs."""

    source: dict[str, torch.Tensor]  # (timesteps, N_erase, T, d)
    target: dict[str, torch.Tensor]  # (timesteps, N_erase, Q, d_out): the anchors' unedited outputs
    keep: dict[str, torch.Tensor]
    keep_target: dict[str, torch.Tensor]
    given: int  # the first ``given`` erase prompts spell the user's concepts (adversaries start there)
    phrase: list[list[int]]  # their concept rows

    def add(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
        for name in self.source:
            self.source[name] = torch.cat([self.source[name], source[name]], dim=1)
            self.target[name] = torch.cat([self.target[name], target[name]], dim=1)

    def loss(
        self, blocks: list[JointBlock], params: dict, erase: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(erase loss, keep loss) of the rows ``erase`` and ``keep``, means over blocks."""
        loss_e = loss_k = 0.0
        for block in blocks:
            factors = LayerFactors(**params[block.name])
            rows = torch.cat([self.source[block.name][:, erase], self.keep[block.name][:, keep]], dim=1)
            got_e, got_k = joint_output(block, rows, factors).split([len(erase), len(keep)], dim=1)
            loss_e = loss_e + _relative(got_e, self.target[block.name][:, erase])
            loss_k = loss_k + _relative(got_k, self.keep_target[block.name][:, keep])
        return loss_e / len(blocks), loss_k / len(blocks)


def collect_joint_data(
    streams: BlockStreams, blocks: list[JointBlock], spec: Any, synonyms: list[str]
) -> JointData:
    """The closed form's prompts (:func:`.data.fit_jobs`: the concepts in their templates and paired
    prompts, the user's synonyms in theirs) with their anchors, and the prompts to keep (unrelated,
    preserved, the anchors themselves), through the transformer."""
    jobs = fit_jobs(spec, FitSettings(), {s: spec.concepts[0] for s in synonyms} or None)
    concept, neutral = [j[0] for j in jobs.concept], [j[0] for j in jobs.neutral]
    keep = list(dict.fromkeys([j[0] for j in jobs.other] + neutral))
    given = len(jobs.concept) - jobs.neighbour_jobs
    segments = streams.segments()
    phrase = [phrase_rows(job, segments) for job in jobs.concept[:given]]
    device = next(streams.model.parameters()).device
    source, anchors, kept = (
        {name: rows.to(device) for name, rows in streams.capture(prompts).items()}
        for prompts in (concept, neutral, keep)
    )
    with torch.no_grad():
        target = {b.name: joint_output(b, anchors[b.name], None) for b in blocks}
        keep_target = {b.name: joint_output(b, kept[b.name], None) for b in blocks}
    return JointData(source, target, kept, keep_target, given, phrase)


def stream_adversary(
    blocks: list[JointBlock], params: dict, data: JointData, index: int, *, radius: float, steps: int
) -> dict[str, torch.Tensor] | None:
    """Erase prompt ``index``'s concept rows moved, in every block's stream, to where the edited block
    reads them most like the unedited block reads the concept (module docstring); None without rows."""
    rows = data.phrase[index]
    if not rows:
        return None
    frozen = {name: LayerFactors(**{k: v.detach() for k, v in p.items()}) for name, p in params.items()}
    found = {}
    for block in blocks:
        source = data.source[block.name][:, index : index + 1]
        with torch.no_grad():
            wanted = joint_output(block, source, None)
        init = source[:, :, rows]
        ball = radius * init.norm(dim=-1, keepdim=True)
        delta = (0.1 * ball * torch.randn_like(init) / init.shape[-1] ** 0.5).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=float(0.05 * init.norm(dim=-1).mean()))
        for _ in range(steps):
            moved = source.clone()
            moved[:, :, rows] = init + delta
            (grad,) = torch.autograd.grad(
                _relative(joint_output(block, moved, frozen[block.name]), wanted), [delta]
            )
            delta.grad = grad
            optimizer.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(ball / delta.norm(dim=-1, keepdim=True).clamp_min(1e-8), max=1.0))
        moved = source.clone()
        moved[:, :, rows] = init + delta.detach()
        found[block.name] = moved
    return found


def fine_tune_joint(trainer: Any, base: Any, clock: Any) -> tuple[dict[str, LayerFactors], int]:
    """``trainer``'s fine-tuning (an :class:`~.trainer.ACETrainer`'s settings) on a joint-attention
    pipeline, from the closed-form adapter ``base``: the trained factors per block and the number of
    adversaries found; the losses go to ``trainer.record_losses`` as in the UNet path."""
    started, rng = time.perf_counter(), random.Random(trainer.seed)
    streams = block_streams(trainer.pipe)
    spec = trainer.spec
    templates = spec.templates_for(spec.concepts[0])
    anchors = [normalize_prompt(filled(t, spec.neutral[0])) for t in templates]
    with clock("query capture"):
        blocks = capture_image_queries(
            streams, anchors[:QUERY_PROMPTS], per_block=trainer.queries_per_layer, seed=trainer.seed
        )
    with clock("training set"):
        data = collect_joint_data(streams, blocks, spec, trainer.synonyms)
        device = next(streams.model.parameters()).device
        params = {
            name: {k: nn.Parameter(getattr(f, k).detach().clone().float().to(device)) for k in TENSOR_KEYS}
            for name, f in base.layers.items()
        }
        everything = [p for group in params.values() for p in group.values()]
        measure = _fixed_loss(blocks, params, data)
        trainer.initial_loss = measure()
    optimizer = torch.optim.Adam(everything, lr=trainer.learning_rate)
    adversaries, pending = 0, []
    bar = tqdm(
        range(trainer.steps), desc="ACE fine-tuning (joint)", disable=not trainer.progress, leave=False
    )
    for step in bar:
        if trainer.time_budget is not None and time.perf_counter() - started > trainer.time_budget:
            break
        if trainer.adversarial and step % trainer.adversarial_every == 0:
            with clock("adversaries"):
                index = rng.randrange(data.given)
                found = stream_adversary(
                    blocks,
                    params,
                    data,
                    index,
                    radius=trainer.adversarial_radius,
                    steps=trainer.adversarial_steps,
                )
            if found is not None:
                data.add(found, {name: t[:, index : index + 1] for name, t in data.target.items()})
                adversaries += 1
        with clock("steps"):
            pending.append(_step(trainer, blocks, params, data, optimizer, everything))
        trainer.record_losses(pending, bar)
    trainer.record_losses(pending, bar, final=True)
    bar.close()
    trainer.final_loss = measure()
    layers = {
        name: LayerFactors(**{k: v.detach().clone() for k, v in p.items()}) for name, p in params.items()
    }
    return layers, adversaries


def _fixed_loss(blocks: list[JointBlock], params: dict, data: JointData) -> Callable[[], float]:
    """The erase loss over every pair known before training (the trainer's before/after figure, as
    the UNet path's)."""
    erase, keep = torch.arange(data.source[blocks[0].name].shape[1]), torch.arange(1)

    def measure() -> float:
        with torch.no_grad():
            return float(data.loss(blocks, params, erase, keep)[0])

    return measure


def _step(
    trainer: Any,
    blocks: list[JointBlock],
    params: dict,
    data: JointData,
    optimizer: Any,
    everything: list[nn.Parameter],
) -> torch.Tensor:
    """One optimiser step on a batch of erase rows and one of keep rows; gradients for the adapter only
    (none is computed for, or left on, the transformer's norms)."""
    n_erase, n_keep = data.source[blocks[0].name].shape[1], data.keep[blocks[0].name].shape[1]
    erase = torch.randint(n_erase, (min(trainer.batch_size, n_erase),))
    keep = torch.randint(n_keep, (min(trainer.batch_size, n_keep),))
    loss_e, loss_k = data.loss(blocks, params, erase, keep)
    loss = loss_e + trainer.preserve_weight * loss_k
    grads = torch.autograd.grad(loss, everything)
    for p, g in zip(everything, grads, strict=True):
        p.grad = g
    optimizer.step()
    return torch.stack([loss, loss_e, loss_k]).detach()
