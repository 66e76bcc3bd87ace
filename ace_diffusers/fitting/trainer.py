"""``ACETrainer``: ACE's second stage — adversarially augmented fine-tuning of the closed-form adapter.

The closed form erases the words it was shown. Fine-tuning makes the erasure general:

1. **Initialise** every layer's factors and the gate from :func:`.closed_form.fit_adapter`.
2. **Objective — attention-output alignment.** For each cross-attention layer we keep a bank of real
   queries ``q`` (captured once from the UNet on noised latents). For a prompt ``P`` that should be
   erased and its neutral counterpart ``P_n`` the loss is
   ``||Attn(q, K_edit(P), V_edit(P)) − Attn(q, K(P_n), V(P_n))||²``; for preservation and unrelated
   prompts the target is the unedited model on the same prompt. Whole padded prompts are compared, so
   no token alignment is needed, and no UNet forward or backward pass is — which is why a step costs
   milliseconds where ESD's denoiser-space loss costs a UNet pass.
3. **Adversarial augmentation.** (a) *Mined near-synonyms*: vocabulary words that the UNet's
   cross-attention reads like the concept (their projected keys/values point where the concept's do,
   and in context they shift the attention output towards the concept's and not towards a preserved
   concept's) join the prompts to erase — found from the model alone, never from a synonym list. (b)
   *Embedding-space adversaries*: every few steps a few gradient steps on soft input
   embeddings that replace the concept's tokens look for the input whose *edited* attention output is
   closest to the *original* concept's (i.e. that slips through the current adapter), within a ball of
   ``adversarial_radius`` times each token's norm, in the concept's plain and paired ("X and Y")
   templates; the result is fed back as a training prompt with the neutral target (AdvUnlearn/RECE-style).
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.adapter import ACEAdapter
from ..core.factors import LayerFactors
from ..errors import ACEValueError
from ..integration.modules import get_unet, projection_weight
from .attention import (
    KeysValues,
    QueryLayer,
    alignment_losses,
    attention_output,
    capture_queries,
    detached,
    encode_full,
    unedited_keys_values,
    unedited_outputs,
)
from .closed_form import check_rank, fit_adapter
from .data import FitSettings, context_templates
from .mining import mine_synonyms
from .presets import filled, normalize_prompt, resolve_spec
from .text import TextEmbedder

MAX_DEFAULT_STEPS = 2000
# How far (a share of each token's input-embedding norm) an adversary may move from the concept's own
# tokens. On the miniature world (the other object of "a red hexagon and a striped blue square" still
# drawn, 64 images) 0.5 left 80 % of hexagon's and 75 % of cross's kept objects, 0.25 kept 95 % and
# 100 % with every erasure bar still met: a wider ball reaches what the prompt's other words read like.
ADVERSARIAL_RADIUS = 0.25


def default_steps(n_concepts: int) -> int:
    """450 for one concept, +50 per extra concept, at most 2000.

    Each step draws a fixed-size batch, so every concept of a multi-concept adapter is seen less often
    per step. On the miniature world (``ace-diffusers bench trainer``, 4 images per prompt) 300 steps
    left held-out synonyms of *cross* at 18.8 % Acc_g and of *square* in a 4-concept adapter at 18.8 %;
    450 and 600 steps brought them to 12.5 % and 3.1 %.
    """
    return min(450 + 50 * (n_concepts - 1), MAX_DEFAULT_STEPS)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ACEValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ACEValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


class ACETrainer:
    """Fit an erasure adapter in two stages (closed form, then adversarial fine-tuning).

    Example::

        trainer = ACETrainer(pipe, "Van Gogh", kind="style")  # steps: default_steps(n_concepts)
        adapter = trainer.fit()          # also available as trainer.adapter
        pipe.load_ace_adapter(adapter)
        trainer.save("erase-van-gogh")   # or trainer.push_to_hub("org/erase-van-gogh")
    """

    def __init__(
        self,
        pipe: Any,
        concepts: str | list[str],
        *,
        neutral: str | list[str] | None = None,
        kind: str | None = None,
        preserve: str | list[str] | None = None,
        templates: list[str] | dict[str, list[str]] | None = None,
        synonyms: list[str] | None = None,
        rank: int | None = None,
        steps: int | None = None,
        learning_rate: float = 2e-3,
        adversarial: bool = True,
        adversarial_every: int = 20,
        adversarial_steps: int = 8,
        adversarial_radius: float = ADVERSARIAL_RADIUS,
        mined_synonyms: int = 16,
        mining_pool: int = 4096,
        preserve_weight: float = 2.0,
        queries_per_layer: int = 64,
        batch_size: int = 32,
        time_budget: float | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.pipe = pipe
        self.unet = get_unet(pipe)
        self.spec = resolve_spec(concepts, neutral=neutral, kind=kind, preserve=preserve, templates=templates)
        if isinstance(synonyms, str):  # one synonym, not a list of its letters
            synonyms = [synonyms]
        if synonyms is not None and not isinstance(synonyms, (list, tuple)):
            raise ACEValueError(f"synonyms must be a list of strings, got {type(synonyms).__name__}.")
        self.synonyms = [s for s in (synonyms or []) if isinstance(s, str) and s.strip()]
        if synonyms is not None and len(self.synonyms) != len(synonyms):
            raise ACEValueError("synonyms must be a list of non-empty strings.")
        if rank is not None:  # refused now, not after the query bank is built
            width = self.unet.config.cross_attention_dim
            check_rank(rank, max(width) if isinstance(width, (list, tuple)) else int(width))
        self.rank = rank
        self.steps = (
            default_steps(len(self.spec.concepts))
            if steps is None
            else _positive_int(steps, "steps", minimum=0)
        )
        self.learning_rate = _positive_float(learning_rate, "learning_rate")
        self.adversarial = bool(adversarial)
        self.adversarial_every = _positive_int(adversarial_every, "adversarial_every")
        self.adversarial_steps = _positive_int(adversarial_steps, "adversarial_steps")
        self.adversarial_radius = _positive_float(adversarial_radius, "adversarial_radius")
        self.mined_synonyms = _positive_int(mined_synonyms, "mined_synonyms", minimum=0)
        self.mining_pool = _positive_int(mining_pool, "mining_pool")
        self.preserve_weight = _positive_float(preserve_weight, "preserve_weight")
        self.queries_per_layer = _positive_int(queries_per_layer, "queries_per_layer")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.time_budget = None if time_budget is None else _positive_float(time_budget, "time_budget")
        self.seed = int(seed)
        self.progress = progress
        self.adapter: ACEAdapter | None = None
        self.history: list[float] = []
        self.initial_loss = self.final_loss = float("nan")

    # ------------------------------------------------------------------ public
    def fit(self) -> ACEAdapter:
        started = time.perf_counter()
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        embedder = TextEmbedder(self.pipe)
        layers, mined = self._setup(embedder)
        # the closed-form start erases the same mined words (no second mining)
        base = fit_adapter(self.pipe, self.spec, FitSettings(rank=self.rank), neighbours=mined)
        params = self._parameters(base)
        # The user's words and the augmentations (mined words, user synonyms, adversaries) fill half of
        # every erase batch each: many augmentations must never crowd out the concept itself.
        targets = _Targets(embedder, layers)
        given_src, given_tgt = self._pairs(embedder, self.spec.concepts, targets)
        augmented = list(mined) + self.synonyms
        extra_src, extra_tgt = (
            self._pairs(embedder, augmented, targets, mined) if augmented else (given_src[:0], given_tgt[:0])
        )
        keep = self._keep_prompts(embedder)
        keep_wanted = unedited_outputs(layers, keep)
        fixed_src, fixed_tgt = torch.cat([given_src, extra_src]), torch.cat([given_tgt, extra_tgt])
        with torch.no_grad():
            self.initial_loss = float(self._erase_loss(layers, params, fixed_src, targets.rows(fixed_tgt)))
        adversary_rows = self.steps // self.adversarial_every + 1 if self.adversarial else 0
        kept = _kept_projections(layers, len(fixed_src) + adversary_rows + len(keep), keep.shape[1])
        given, extra, keep_pool = (_Pool(layers, rows, kept) for rows in (given_src, extra_src, keep))
        optimizer = torch.optim.Adam(
            [p for group in params.values() for p in group.values()], lr=self.learning_rate
        )
        adversaries = 0
        bar = tqdm(range(self.steps), desc="ACE fine-tuning", disable=not self.progress, leave=False)
        for step in bar:
            if self.time_budget is not None and time.perf_counter() - started > self.time_budget:
                break
            if self.adversarial and step % self.adversarial_every == 0:
                found = self._adversary(embedder, layers, params, rng)
                if found is not None:
                    extra.add(found[0])
                    extra_tgt = torch.cat([extra_tgt, targets.index([found[1]])])
                    adversaries += 1
            idx_g, idx_x = self._erase_batch(len(given), len(extra))
            idx_k = torch.randint(len(keep_pool), (min(self.batch_size, len(keep_pool)),))
            batch_tgt = torch.cat([given_tgt[idx_g], extra_tgt[idx_x]])
            source, unedited = _Pool.take([(given, idx_g), (extra, idx_x), (keep_pool, idx_k)])
            # one attention pass per layer for both halves; the unedited targets were computed once
            wanted = [
                torch.cat([erase, kept[idx_k]])
                for erase, kept in zip(targets.rows(batch_tgt), keep_wanted, strict=True)
            ]
            loss_erase, loss_keep = alignment_losses(
                layers, params, source, wanted, [len(batch_tgt), len(idx_k)], unedited
            )
            loss = loss_erase + self.preserve_weight * loss_keep
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.history.append(float(loss.detach()))
            if not math.isfinite(self.history[-1]):
                raise ACEValueError(
                    f"Training diverged at step {step + 1} of {self.steps} (loss {self.history[-1]}): "
                    f"learning_rate={self.learning_rate:g} is too large for this model. Try 2e-3 (the "
                    "default) or lower; the closed-form adapter is unaffected."
                )
            bar.set_postfix(erase=f"{loss_erase.item():.4f}", keep=f"{loss_keep.item():.4f}")
        bar.close()
        with torch.no_grad():
            self.final_loss = float(self._erase_loss(layers, params, fixed_src, targets.rows(fixed_tgt)))

        self.adapter = self._to_adapter(base, params, mined, adversaries, time.perf_counter() - started)
        return self.adapter

    def _setup(self, embedder: TextEmbedder) -> tuple[list[QueryLayer], dict[str, str]]:
        """The query bank and the mined synonyms."""
        layers = capture_queries(
            self.unet,
            embedder,
            self.spec.neutral[0],
            self.spec.templates,
            per_layer=self.queries_per_layer,
            seed=self.seed,
        )
        mined = (
            mine_synonyms(embedder, layers, self.spec, per_concept=self.mined_synonyms, pool=self.mining_pool)
            if self.mined_synonyms
            else {}
        )
        return layers, mined

    def _erase_batch(self, given: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one erase batch: half the user's words, half the augmentations (all the user's words
        when there are none)."""
        half = self.batch_size // 2 if extra else self.batch_size
        idx_g = torch.randint(given, (min(half, given),))
        idx_x = torch.randint(extra, (min(self.batch_size - half, extra),)) if extra else idx_g[:0]
        return idx_g, idx_x

    def save(self, save_directory: str | os.PathLike) -> Any:
        return self._fitted().save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        return self._fitted().push_to_hub(repo_id, **kwargs)

    def _fitted(self) -> ACEAdapter:
        if self.adapter is None:
            raise ACEValueError("Call fit() before saving or pushing: nothing has been trained yet.")
        return self.adapter

    # ------------------------------------------------------------------ data
    def _pairs(
        self,
        embedder: TextEmbedder,
        phrases: list[str],
        targets: _Targets,
        source_of: dict[str, str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts with each phrase, and the rows in ``targets`` of the same prompts with its concept's
        anchor; ``source_of`` maps a mined word to the concept it was mined for (its templates and
        anchor are used)."""
        anchor_of = dict(zip(self.spec.concepts, self.spec.neutral, strict=True))
        source_of = source_of or {}
        src, tgt = [], []
        for phrase in phrases:
            concept = source_of.get(phrase, phrase if phrase in anchor_of else self.spec.concepts[0])
            # with prompts that pair it with something kept: that other thing must stay as it is
            for template in self.spec.templates_for(concept) + self._paired(concept):
                src.append(filled(template, phrase))
                tgt.append(normalize_prompt(filled(template, anchor_of[concept])))
        return encode_full(embedder, src), targets.index(tgt)

    @staticmethod
    def _erase_loss(
        layers: list[QueryLayer], params: dict, source: torch.Tensor, wanted: list[torch.Tensor]
    ) -> torch.Tensor:
        return alignment_losses(layers, params, source, wanted, [len(source)])[0]

    def _paired(self, concept: str) -> list[str]:
        """The closed form's paired templates of ``concept`` ("X and Y"): the other thing must stay."""
        settings = FitSettings()
        count = min(settings.context_prompts, settings.context_budget // len(self.spec.concepts))
        return context_templates(self.spec, concept, count)

    def _keep_prompts(self, embedder: TextEmbedder) -> torch.Tensor:
        """Unrelated and preservation prompts, and the paired prompts with the anchor in the concept's
        place (what the other thing of a paired prompt looks like when nothing is to be erased)."""
        anchor_of = dict(zip(self.spec.concepts, self.spec.neutral, strict=True))
        paired = [
            normalize_prompt(filled(t, anchor_of[c]))
            for c in self.spec.concepts
            for t in self._paired(c)
        ]
        prompts = self.spec.unrelated_prompts() + self.spec.preserve_prompts() + list(dict.fromkeys(paired))
        return encode_full(embedder, prompts)

    # ------------------------------------------------------------------ model pieces
    def _parameters(self, base: ACEAdapter) -> dict[str, dict[str, torch.nn.Parameter]]:
        first = next(iter(base.layers.values()))
        params: dict[str, dict[str, torch.nn.Parameter]] = {
            "gate": {
                "weight": torch.nn.Parameter(first.gate_weight.clone().float()),
                "bias": torch.nn.Parameter(first.gate_bias.clone().float()),
            }
        }
        for name, factors in base.layers.items():
            params[name] = {
                key: torch.nn.Parameter(getattr(factors, key).clone().float())
                for key in ("k_down", "k_up", "v_down", "v_up")
            }
        return params

    def _adversary(self, embedder: TextEmbedder, layers: list[QueryLayer], params: dict, rng: random.Random):
        """Soft input embeddings for the concept's tokens that make the *edited* model attend like the
        *original* model does to the concept; returns (source embeddings, neutral target prompt) or None."""
        concept_index = rng.randrange(len(self.spec.concepts))
        concept = self.spec.concepts[concept_index]
        # paired templates too: an adversary found beside something kept must leave that thing as it is
        template = rng.choice(self.spec.templates_for(concept) + self._paired(concept))
        prompt = filled(template, concept)
        tokens, span = _concept_tokens(embedder, prompt, template.index("{}"), concept)
        encoder = embedder.encoders[0][1]
        if not span or len(embedder.encoders) != 1:
            return None
        with torch.no_grad():
            original = encode_full(embedder, [prompt])
            wanted = [attention_output(layer, original, None) for layer in layers]
        embedding_module = encoder.get_input_embeddings()
        init = embedding_module(tokens["input_ids"][:, span]).detach().float()
        soft = (
            init + 0.1 * init.norm(dim=-1, keepdim=True) * torch.randn_like(init) / math.sqrt(init.shape[-1])
        ).requires_grad_(True)
        radius = self.adversarial_radius * init.norm(dim=-1, keepdim=True)
        optimizer = torch.optim.Adam([soft], lr=0.05 * float(init.norm(dim=-1).mean()))

        def replace(module, args, output):
            output = output.clone()
            output[:, span] = soft.to(output.dtype)
            return output

        handle = embedding_module.register_forward_hook(replace)
        try:
            for _ in range(self.adversarial_steps):
                context = self._run_encoder(embedder, tokens["input_ids"])
                loss = sum(
                    ((attention_output(layer, context, detached(params)) - w) ** 2).mean() / w.pow(2).mean()
                    for layer, w in zip(layers, wanted, strict=True)
                )
                # the soft input's gradient only: none is computed for, or left on, the text encoder
                (soft.grad,) = torch.autograd.grad(loss, [soft])
                optimizer.step()
                with torch.no_grad():  # stay near the concept's own embedding
                    delta = soft - init
                    soft.copy_(
                        init
                        + delta
                        * torch.clamp(radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-8), max=1.0)
                    )
            with torch.no_grad():
                source = self._run_encoder(embedder, tokens["input_ids"])
        finally:
            handle.remove()
        return source.detach(), normalize_prompt(filled(template, self.spec.neutral[concept_index]))

    @staticmethod
    def _run_encoder(embedder: TextEmbedder, input_ids: torch.Tensor) -> torch.Tensor:
        _, encoder = embedder.encoders[0]
        return embedder.run_encoder(
            encoder,
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
            input_ids.shape[1],
        )

    def _to_adapter(
        self, base: ACEAdapter, params: dict, mined: dict[str, str], adversaries: int, seconds: float
    ) -> ACEAdapter:
        gate_w = params["gate"]["weight"].detach().clone()
        gate_b = params["gate"]["bias"].detach().clone()
        layers = {
            name: LayerFactors(
                **{key: params[name][key].detach().clone() for key in ("k_down", "k_up", "v_down", "v_up")},
                gate_weight=gate_w.clone(),
                gate_bias=gate_b.clone(),
            )
            for name in base.layers
        }
        fit = dict(base.fit)
        fit["closed_form_seconds"] = fit.pop("seconds", None)
        fit["fine_tuning"] = {
            "steps_run": len(self.history),
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "adversarial": self.adversarial,
            "adversaries_found": adversaries,
            "adversarial_radius": self.adversarial_radius,
            "mined_synonyms": list(mined),
            "user_synonyms": self.synonyms,
            "preserve_weight": self.preserve_weight,
            "seed": self.seed,
            "erase_loss_before": self.initial_loss,
            "erase_loss_after": self.final_loss,
        }
        fit["seconds"] = round(seconds, 3)
        return ACEAdapter(
            layers,
            concepts=base.concepts,
            neutral=base.neutral,
            kind=base.kind,
            method="ace",
            fit=fit,
            base_model=base.base_model,
        )


KEPT_PROJECTIONS_BYTES = 1 << 30  # the unedited keys/values of every training prompt are kept below this


def _kept_projections(layers: list[QueryLayer], rows: int, tokens: int) -> bool:
    """Whether every training prompt's unedited keys/values fit in :data:`KEPT_PROJECTIONS_BYTES`
    (the miniature world: a few MB; many long prompts at SDXL size: recomputed at every step)."""
    width = sum(
        projection_weight(layer.attn.to_k).shape[0] + projection_weight(layer.attn.to_v).shape[0]
        for layer in layers
    )
    return rows * tokens * width * 4 <= KEPT_PROJECTIONS_BYTES


class _Pool:
    """Encoded training prompts and, when kept, every layer's unedited keys/values of them (the bulk of
    an attention pass that does not depend on the adapter: computed once, not at every step)."""

    def __init__(self, layers: list[QueryLayer], context: torch.Tensor, keep_projections: bool) -> None:
        self.layers, self.context = layers, context
        self.unedited = unedited_keys_values(layers, context) if keep_projections else None

    def __len__(self) -> int:
        return len(self.context)

    def add(self, context: torch.Tensor) -> None:
        self.context = torch.cat([self.context, context])
        if self.unedited is not None:
            self.unedited = [
                (torch.cat([k, k_new]), torch.cat([v, v_new]))
                for (k, v), (k_new, v_new) in zip(
                    self.unedited, unedited_keys_values(self.layers, context), strict=True
                )
            ]

    @staticmethod
    def take(picks: list[tuple[_Pool, torch.Tensor]]) -> tuple[torch.Tensor, list[KeysValues] | None]:
        """The rows ``index`` of each pool, in order: (context, per-layer unedited keys/values or None)."""
        context = torch.cat([pool.context[index] for pool, index in picks])
        if any(pool.unedited is None for pool, _ in picks):
            return context, None
        per_layer = zip(*[pool.unedited for pool, _ in picks], strict=True)
        unedited = [
            (
                torch.cat([k[index] for (k, _), (_, index) in zip(layer, picks, strict=True)]),
                torch.cat([v[index] for (_, v), (_, index) in zip(layer, picks, strict=True)]),
            )
            for layer in per_layer
        ]
        return context, unedited


class _Targets:
    """The unedited attention outputs of the anchor prompts that erase prompts are aligned with, each
    prompt encoded and attended once (a concept's, its mined words' and its adversaries' prompts share
    the same few anchor prompts)."""

    def __init__(self, embedder: TextEmbedder, layers: list[QueryLayer]) -> None:
        self.embedder, self.layers = embedder, layers
        self.position: dict[str, int] = {}
        self.outputs: list[torch.Tensor] | None = None  # per layer: (prompts, n_queries, d_v)

    def index(self, prompts: list[str]) -> torch.Tensor:
        """The rows of ``prompts``, computing the outputs of those not seen before."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.position]
        if new:
            outputs = unedited_outputs(self.layers, encode_full(self.embedder, new))
            self.outputs = (
                outputs
                if self.outputs is None
                else [torch.cat([old, add]) for old, add in zip(self.outputs, outputs, strict=True)]
            )
            self.position.update({p: len(self.position) + i for i, p in enumerate(new)})
        return torch.tensor([self.position[p] for p in prompts], dtype=torch.long)

    def rows(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's outputs at ``index``."""
        assert self.outputs is not None, "index() adds prompts before rows() reads them"
        return [out[index] for out in self.outputs]


def _concept_tokens(embedder: TextEmbedder, prompt: str, start: int, concept: str) -> tuple[dict, list[int]]:
    """The padded tokenisation of ``prompt`` and the positions of the tokens that spell ``concept``."""
    tokens = embedder.encoders[0][0](
        prompt,
        padding="max_length",
        max_length=embedder.max_length,
        truncation=True,
        return_tensors="pt",
        return_offsets_mapping=True,
    )
    offsets = tokens["offset_mapping"][0]
    span = [
        t
        for t in range(len(offsets))
        if offsets[t][1] > offsets[t][0] and offsets[t][0] < start + len(concept) and offsets[t][1] > start
    ]
    return tokens, span
