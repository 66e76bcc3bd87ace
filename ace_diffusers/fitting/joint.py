"""The closed form for joint attention (SD3 / SD3.5, FLUX): one gate and one K/V edit per block, on that
block's own text stream.

In SD1.x/SDXL/PixArt every cross-attention layer reads the same text tokens, so one text map serves all
layers (:mod:`.closed_form`). In SD3 the text tokens *evolve*: block ``b``'s joint attention reads the text
stream as the earlier blocks left it (normed and modulated by the timestep), mixed with the image
tokens. So for each block the fit needs that block's inputs, and they are captured: the transformer runs
on noised latents with each prompt's embeddings (``pipe.encode_prompt``, exactly what the pipeline
feeds it: both CLIP encoders' tokens then T5's), a concept prompt and its anchor prompt with the same
latents and timesteps, and a pre-hook on every joint attention records the text tokens it receives.
Per block, with ``c_i`` the concept prompts' captured tokens, ``n_i`` the aligned tokens of the anchor
prompts (:func:`.data.align_tokens`, on the CLIP and on the T5 segment), ``p_j`` those of the prompts to
keep, the objective and its minimiser are :mod:`.solvers`' with that block's ``W = add_k_proj / add_v_proj``
and its own gate. Approximation: each block is fitted on the *unedited* streams of the blocks before it.

FLUX (:class:`FluxBlockStreams`) is the same fit with FLUX's inputs: its prompt embeddings are T5's tokens
alone (CLIP gives only the pooled embedding), the transformer runs on packed latents with position ids,
and a single-stream block's text rows are the first ``T`` rows of what its attention reads (text and image
concatenated; ``T`` the prompt length). There ``W`` is the block's ``to_k`` / ``to_v``, which the image
rows share; the fitted delta is applied to the text rows only (:mod:`ace_diffusers.core.flux`).

The pooled embedding (``pooled_projections``) gets the SDXL edit (:func:`.pooled.fit_pooled_vectors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from tqdm.auto import tqdm

from ..core.adapter import ACEAdapter
from ..core.factors import LayerFactors
from ..errors import ACEValueError
from ..integration.modules import (
    cross_attention_modules,
    get_unet,
    is_joint,
    kv_projections,
    projection_weight,
    single_stream_layers,
    unwrap_model,
)
from .data import CHANGED_TOKEN_THRESHOLD, FitSettings, align_tokens, closed_form_adapter, fit_jobs
from .denoiser import sample_size
from .pooled import fit_pooled_vectors
from .presets import ErasureSpec
from .solvers import FitData, default_rank, fit_gate, low_rank_edits, solve_text_map
from .text import EncodedPrompt, sequence_length, token_span

TIMESTEPS = (300, 700)  # where each prompt's text streams are captured (of the scheduler's 1000)
MAX_OTHER_ROWS = 4096  # per block: a sample of the kept prompts' tokens is enough for their moment
FLUX_GRID = 16  # FLUX: the packed latent grid the text streams are captured with (16 x 16 image tokens)
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's default guidance, for guidance-distilled transformers


def fit_joint_adapter(
    pipe: Any, spec: ErasureSpec, settings: FitSettings, *, progress: bool | None
) -> ACEAdapter:
    """The whole closed-form fit on a joint-attention pipeline (SD3, FLUX); nothing is loaded into it.
    With ``settings.single_stream`` False, FLUX's single-stream blocks get an exact zero edit."""
    started = time.perf_counter()
    model = get_unet(pipe)
    modules = cross_attention_modules(model)
    unedited = set() if settings.single_stream else set(single_stream_layers(model))
    d_text = projection_weight(kv_projections(next(iter(modules.values())))[0]).shape[1]
    rank = settings.rank if settings.rank is not None else default_rank(len(spec.concepts), d_text)
    with tqdm(
        total=len(modules) + 2, desc="ACE closed form (joint)", disable=not progress, leave=False
    ) as bar:
        data = JointFitData.collect(pipe, spec, settings)
        bar.update()
        layers, stats = {}, {}
        for name in sorted(modules):
            if name in unedited:
                layers[name], stats[name] = zero_factors(modules[name], rank), {"edited": False}
            else:
                layers[name], stats[name] = _block_factors(
                    modules[name], data.concept[name], data.target[name], data.others[name], settings, rank
                )
            bar.update()
        pooled = fit_pooled_vectors(*data.pooled(), torch.ones(len(data.prompts[0])), settings, rank)
        bar.update()
    fit = {
        "settings": {**settings.to_dict(), "rank": rank, "neighbours": 0},
        "templates": spec.templates,
        "preserve": spec.preserve,
        "joint_attention": {"timesteps": list(TIMESTEPS), "per_block": stats},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return closed_form_adapter(pipe, spec, layers, fit, pooled)


@dataclass
class JointFitData:
    """Per block: the concept prompts' aligned text rows, their anchors', a sample of the kept prompts'."""

    concept: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    others: dict[str, torch.Tensor]
    prompts: tuple[list[str], list[str], list[str]]  # concept, neutral, kept prompts
    streams: BlockStreams

    @classmethod
    def collect(cls, pipe: Any, spec: ErasureSpec, settings: FitSettings) -> JointFitData:
        """The prompts of :func:`.data.fit_jobs` (no mined neighbours: the miner reads one CLIP encoder)
        through the transformer."""
        jobs = fit_jobs(spec, settings, None)
        concept, neutral = [j[0] for j in jobs.concept], [j[0] for j in jobs.neutral]
        others = list(dict.fromkeys([j[0] for j in jobs.other] + neutral))
        streams = block_streams(pipe)
        pairs = [
            aligned_rows(pipe, c, n, streams.segments())
            for c, n in zip(jobs.concept, jobs.neutral, strict=True)
        ]
        c_rows, n_rows = streams.paired(concept, neutral, pairs)
        return cls(c_rows, n_rows, streams.rows(others), (concept, neutral, others), streams)

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled embeddings of the concept, anchor and kept prompts."""
        return tuple(self.streams.pooled(prompts) for prompts in self.prompts)


class BlockStreams:
    """What each joint block's attention reads of the text, for given prompts (module docstring)."""

    def __init__(
        self, pipe: Any, model: torch.nn.Module, modules: dict, *, batch_size: int = 16, seed: int = 0
    ):
        self.pipe, self.model, self.modules = pipe, model, modules
        self.batch_size, self.seed = batch_size, seed
        self.encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt embeddings, pooled embeddings)`` as ``pipe.encode_prompt`` gives them (float32, CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.encoded]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            embeds, pooled = self._encode_batch(batch)
            for i, prompt in enumerate(batch):
                self.encoded[prompt] = (embeds[i].float().cpu(), pooled[i].float().cpu())
        return (
            torch.stack([self.encoded[p][0] for p in prompts]),
            torch.stack([self.encoded[p][1] for p in prompts]),
        )

    def _encode_batch(self, batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=batch,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=sequence_length(self.pipe) or 256,
        )
        return embeds, pooled

    def segments(self) -> list[tuple[Any, int, int]]:
        """``(tokenizer, rows, first row)`` of each encoder's segment of the prompt embeddings: SD3's CLIP
        rows (both CLIP encoders share the tokenizer), then its T5 rows if it has a T5 encoder."""
        pipe = self.pipe
        segments = [(pipe.tokenizer, pipe.tokenizer_max_length, 0)]
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None):
            segments.append((pipe.tokenizer_3, sequence_length(pipe) or 256, pipe.tokenizer_max_length))
        return segments

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[1]

    def _forward(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep: int):
        param = next(self.model.parameters())
        self.model(
            hidden_states=latents.to(param.device, param.dtype),
            encoder_hidden_states=embeds.to(param.device, param.dtype),
            pooled_projections=pooled.to(param.device, param.dtype),
            timestep=torch.full((len(latents),), float(timestep), device=param.device),
        )

    def _text_rows(self, name: str, kwargs: dict, text_length: int) -> torch.Tensor:
        """The text rows a joint attention receives: its ``encoder_hidden_states``."""
        return kwargs["encoder_hidden_states"]

    @torch.no_grad()
    def capture(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{block: (timesteps, prompts, rows, d)}``: the text tokens each joint attention receives. The
        latents of prompt ``i`` depend on ``i`` only, so two prompt lists see the same noise row by row."""
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}

        def record(name: str, kwargs: dict, text_length: int) -> None:
            captured[name].append(self._text_rows(name, kwargs, text_length).float().cpu())

        self.run(prompts, record)
        steps = len(TIMESTEPS)
        return {
            n: torch.cat(rows).reshape(steps, len(prompts), *rows[0].shape[1:])
            for n, rows in captured.items()
        }

    @torch.no_grad()
    def run(self, prompts: list[str], record: Callable[[str, dict, int], None]) -> None:
        """The transformer on ``prompts`` at every timestep of :data:`TIMESTEPS` (in that order, prompts
        in batches); ``record(block, its attention's keyword inputs, text length)`` sees each call."""
        embeds, pooled = self.encode(prompts)

        def hook(name: str):
            return lambda m, args, kwargs: record(name, kwargs, embeds.shape[1])

        handles = [
            attn.register_forward_pre_hook(hook(n), with_kwargs=True) for n, attn in self.modules.items()
        ]
        try:
            for timestep in TIMESTEPS:
                for start in range(0, len(prompts), self.batch_size):
                    stop = min(start + self.batch_size, len(prompts))
                    latents = torch.stack([self._latents(i) for i in range(start, stop)])
                    self._forward(latents, embeds[start:stop], pooled[start:stop], timestep)
        finally:
            for handle in handles:
                handle.remove()

    def _latents(self, index: int) -> torch.Tensor:
        size = sample_size(self.model)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randn(self.model.config.in_channels, size, size, generator=generator)

    def paired(
        self, concept: list[str], neutral: list[str], pairs: list[list[tuple[int, int]]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per block, the concept prompts' aligned rows and their anchors' (same noise, same timesteps)."""
        c_cap, n_cap = self.capture(concept), self.capture(neutral)
        c_rows, n_rows = {}, {}
        for name in self.modules:
            cs, ns = [], []
            for i, pair in enumerate(pairs):
                ci, nj = torch.tensor([a for a, _ in pair]), torch.tensor([b for _, b in pair])
                cs.append(c_cap[name][:, i, ci].flatten(0, 1))
                ns.append(n_cap[name][:, i, nj].flatten(0, 1))
            c_rows[name], n_rows[name] = torch.cat(cs), torch.cat(ns)
        return c_rows, n_rows

    def rows(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per block, a fixed sample of at most :data:`MAX_OTHER_ROWS` of the prompts' text rows."""
        out = {}
        for name, captured in self.capture(prompts).items():
            flat = captured.flatten(0, 2)
            pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(self.seed))[
                :MAX_OTHER_ROWS
            ]
            out[name] = flat[pick]
        return out


def _block_factors(attn, c, n, others, settings: FitSettings, rank: int) -> tuple[LayerFactors, dict]:
    change = (c - n).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-8)
    positive = change > CHANGED_TOKEN_THRESHOLD
    if not bool(positive.any()):
        raise ACEValueError(
            "The concept prompts' text streams equal their anchors' in a joint-attention block; there is "
            "nothing to erase. Check the spelling or choose another anchor."
        )
    gate_w, gate_b, gate_stats = fit_gate(
        c[positive], torch.cat([c[~positive], others]), ridge=settings.gate_ridge
    )
    data = FitData(concept=c, target=n, gate_positive=positive, others=others)
    h, root, stats = solve_text_map(
        data, gate_w, gate_b, preserve_weight=settings.preserve_weight, ridge=settings.ridge
    )
    weights = [projection_weight(p).detach().cpu() for p in kv_projections(attn)]
    (k_down, k_up), (v_down, v_up) = low_rank_edits(weights, h.float(), root.float(), rank)
    stats = {k: round(float(v), 6) for k, v in {**gate_stats, **stats}.items()}
    return LayerFactors(k_down, k_up, v_down, v_up, gate_w, gate_b), stats


def zero_factors(attn: torch.nn.Module, rank: int) -> LayerFactors:
    """Factors that add exactly nothing (``B = 0``; gate shut): a block the fit leaves unedited."""
    (d_k, d_text), (d_v, _) = (projection_weight(p).shape for p in kv_projections(attn))
    return LayerFactors(
        torch.zeros(rank, d_text), torch.zeros(d_k, rank), torch.zeros(rank, d_text), torch.zeros(d_v, rank),
        torch.zeros(d_text), torch.full((1,), -10.0),
    )


def aligned_rows(
    pipe: Any, concept_job: tuple, neutral_job: tuple, segments: list[tuple[Any, int, int]] | None = None
) -> list[tuple[int, int]]:
    """Aligned (concept row, anchor row) of the prompt embeddings, segment by segment (default: SD3's
    CLIP rows, then its T5 rows; :meth:`BlockStreams.segments`), each aligned around the marked phrase."""
    pairs = []
    if segments is None:
        segments = block_streams(pipe).segments()
    for tokenizer, length, offset in segments:
        c_enc, n_enc = (_segment(tokenizer, job, length) for job in (concept_job, neutral_job))
        pairs += [(offset + i, offset + j) for i, j in align_tokens(c_enc, n_enc)]
    return pairs


def phrase_rows(job: tuple, segments: list[tuple[Any, int, int]]) -> list[int]:
    """Rows of the prompt embeddings (every segment's, :meth:`BlockStreams.segments`) that spell the
    marked phrase of ``job``."""
    rows = []
    for tokenizer, length, offset in segments:
        span = _segment(tokenizer, job, length).span
        rows += [] if span is None else [offset + i for i in range(*span)]
    return rows


def _segment(tokenizer: Any, job: tuple, length: int) -> EncodedPrompt:
    """A prompt's rows in one encoder's segment (placeholders: only their count matters) and the token
    span of its marked phrase."""
    prompt, chars = job[0], job[1]
    tokens = tokenizer(
        prompt, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True
    )
    used = sum(tokens["attention_mask"])
    span = token_span(tokens["offset_mapping"], chars, used)
    return EncodedPrompt(prompt, torch.zeros(length, 1), span, used)


class FluxBlockStreams(BlockStreams):
    """:class:`BlockStreams` for FLUX: T5 tokens as the prompt embeddings, packed latents with position
    ids, and the text rows of single-stream blocks (module docstring)."""

    def _encode_batch(self, batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=batch, prompt_2=None, max_sequence_length=sequence_length(self.pipe) or 512
        )
        return embeds, pooled

    def segments(self) -> list[tuple[Any, int, int]]:
        return [(self.pipe.tokenizer_2, sequence_length(self.pipe) or 512, 0)]

    def _latents(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randn(FLUX_GRID * FLUX_GRID, self.model.config.in_channels, generator=generator)

    def _forward(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep: int):
        param = next(self.model.parameters())
        image_ids = flux_image_ids(FLUX_GRID)
        batch = len(latents)
        guidance = None
        if unwrap_model(self.model).config.guidance_embeds:
            guidance = torch.full((batch,), FLUX_GUIDANCE, device=param.device, dtype=param.dtype)
        self.model(
            hidden_states=latents.to(param.device, param.dtype),
            encoder_hidden_states=embeds.to(param.device, param.dtype),
            pooled_projections=pooled.to(param.device, param.dtype),
            timestep=torch.full((batch,), timestep / 1000, device=param.device, dtype=param.dtype),
            img_ids=image_ids.to(param.device, param.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=param.device, dtype=param.dtype),
            guidance=guidance,
        )

    def _text_rows(self, name: str, kwargs: dict, text_length: int) -> torch.Tensor:
        """Double-stream: the text stream; single-stream: the first ``text_length`` rows of
        ``[text; image]``."""
        if is_joint(self.modules[name]):
            return kwargs["encoder_hidden_states"]
        return kwargs["hidden_states"][:, :text_length]


def flux_image_ids(side: int) -> torch.Tensor:
    """FLUX's position ids of a ``side x side`` grid of packed image tokens: ``(0, row, column)`` each."""
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def block_streams(pipe: Any) -> BlockStreams:
    """The text-stream capture for ``pipe``'s joint-attention transformer (SD3, or FLUX)."""
    model = get_unet(pipe)
    kind = FluxBlockStreams if isinstance(unwrap_model(model), FluxTransformer2DModel) else BlockStreams
    return kind(pipe, model, cross_attention_modules(model))
