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
3. **Adversarial augmentation.** (a) *Mined near-synonyms*: vocabulary and (``dictionary``) English
   words that the UNet's cross-attention reads like the concept (:mod:`.mining`) join the prompts to
   erase — found from the model alone, never from a synonym list. (b)
   *Embedding-space adversaries*: every few steps a few gradient steps on soft input
   embeddings that replace the concept's tokens look for the input whose *edited* attention output is
   closest to the *original* concept's (i.e. that slips through the current adapter), within a ball of
   ``adversarial_radius`` times each token's norm, in the concept's plain and paired ("X and Y")
   templates; the result is fed back as a training prompt with the neutral target (AdvUnlearn/RECE-style).
   (c) *Concept vectors* (``concept_vectors=n``, off by default): innocuous prompts shifted along the
   concept's direction in the encoder output, each aligned with its own unshifted self
   (:mod:`.concept_vectors`) — the defence against the concept-vector attack; its cost is the
   ``"concept vectors"`` phase of ``fit["fine_tuning"]["phase_seconds"]``.
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
from ..format import TENSOR_KEYS
from ..integration.modules import get_unet, layer_shapes, reads_joint_text
from .adversary import soft_adversary
from .attention import QueryLayer, capture_queries, detached, encode_full, layer_factors, unedited_outputs
from .batches import PromptPool, TargetBank, TrainingSet, kept_projections
from .clock import PhaseClock
from .closed_form import check_rank, fit_adapter
from .concept_vectors import concept_vector_pairs
from .data import FitSettings, context_count, context_templates
from .joint_tuning import fine_tune_joint
from .mining import mine_synonyms
from .phrases import search_phrases
from .presets import filled, normalize_prompt, resolve_spec
from .text import TextEmbedder
from .trainer_args import (
    check_trainable,
    default_steps,
    positive_float,
    positive_int,
    synonym_list,
)

LOSS_READ_EVERY = 10  # steps between reading the losses back from the device (progress, divergence check)

# How far (a share of each token's input-embedding norm) an adversary may move from the concept's own
# tokens. On the miniature world (the other object of "a red hexagon and a striped blue square" still
# drawn, 64 images) 0.5 left 80 % of hexagon's and 75 % of cross's kept objects, 0.25 kept 95 % and
# 100 % with every erasure bar still met: a wider ball reaches what the prompt's other words read like.
ADVERSARIAL_RADIUS = 0.25


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
        dictionary: bool = True,
        search_phrases: int = 0,
        concept_vectors: int = 0,
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
        self.joint = reads_joint_text(pipe)  # SD3, FLUX: fine-tuned block by block (.joint_tuning)
        self.spec = resolve_spec(concepts, neutral=neutral, kind=kind, preserve=preserve, templates=templates)
        self.synonyms = synonym_list(synonyms)
        if rank is not None:  # refused now, not after the query bank is built
            check_rank(rank, max(shape[0] for shape in layer_shapes(self.unet).values()))
        self.rank = rank
        n_concepts = len(self.spec.concepts)
        self.steps = default_steps(n_concepts) if steps is None else positive_int(steps, "steps", minimum=0)
        self.learning_rate = positive_float(learning_rate, "learning_rate")
        self.adversarial = bool(adversarial)
        self.adversarial_every = positive_int(adversarial_every, "adversarial_every")
        self.adversarial_steps = positive_int(adversarial_steps, "adversarial_steps")
        self.adversarial_radius = positive_float(adversarial_radius, "adversarial_radius")
        self.mined_synonyms = positive_int(mined_synonyms, "mined_synonyms", minimum=0)
        self.search_phrases = positive_int(search_phrases, "search_phrases", minimum=0)
        self.concept_vectors = positive_int(concept_vectors, "concept_vectors", minimum=0)
        check_trainable(pipe, search_phrases=self.search_phrases, concept_vectors=self.concept_vectors)
        self.mining_pool = positive_int(mining_pool, "mining_pool")
        self.dictionary = bool(dictionary)
        self.preserve_weight = positive_float(preserve_weight, "preserve_weight")
        self.queries_per_layer = positive_int(queries_per_layer, "queries_per_layer")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.time_budget = None if time_budget is None else positive_float(time_budget, "time_budget")
        self.seed = int(seed)
        self.progress = progress
        self.adapter: ACEAdapter | None = None
        self.searched: dict[str, str] = {}  # phrases found by search_phrases (set by fit)
        self.history: list[float] = []
        self.initial_loss = self.final_loss = float("nan")

    # ------------------------------------------------------------------ public
    def fit(self) -> ACEAdapter:
        started = time.perf_counter()
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        clock = PhaseClock()
        if self.joint:
            return self._fit_joint(started, clock)
        embedder = TextEmbedder(self.pipe)
        layers, mined = self._setup(embedder, clock)
        with clock("closed form"):  # the closed-form start erases the same mined words (no second mining)
            base = fit_adapter(self.pipe, self.spec, FitSettings(rank=self.rank), neighbours=mined)
        with clock("training set"):
            params = self._parameters(base)
            data = self._training_set(embedder, layers, mined)
            with torch.no_grad():
                self.initial_loss = float(data.fixed_loss(layers, params))
        if self.concept_vectors:
            with clock("concept vectors"):
                for source, target in concept_vector_pairs(embedder, self.spec, self.concept_vectors):
                    data.add(source, target)
        optimizer = torch.optim.Adam(
            [p for group in params.values() for p in group.values()], lr=self.learning_rate
        )
        adversaries = 0
        bar = tqdm(range(self.steps), desc="ACE fine-tuning", disable=not self.progress, leave=False)
        pending: list[torch.Tensor] = []  # losses of steps not yet read back (see _read_losses)
        for step in bar:
            if self.time_budget is not None and time.perf_counter() - started > self.time_budget:
                break
            if self.adversarial and step % self.adversarial_every == 0:
                with clock("adversaries"):
                    found = self._adversary(embedder, layers, params, rng)
                if found is not None:
                    data.add(*found)
                    adversaries += 1
            with clock("steps"):
                pending.append(self._step(data, layers, params, optimizer))
            self.record_losses(pending, bar)
        self.record_losses(pending, bar, final=True)
        bar.close()
        with torch.no_grad():
            self.final_loss = float(data.fixed_loss(layers, params))
        self.phase_seconds = clock.seconds
        trained = {name: layer_factors(params, name) for name in base.layers}
        self.adapter = self._to_adapter(base, trained, mined, adversaries, time.perf_counter() - started)
        return self.adapter

    def _fit_joint(self, started: float, clock: PhaseClock) -> ACEAdapter:
        """SD3 / FLUX: the joint closed form, then :func:`.joint_tuning.fine_tune_joint`."""
        with clock("closed form"):
            base = fit_adapter(self.pipe, self.spec, FitSettings(rank=self.rank))
        trained, adversaries = fine_tune_joint(self, base, clock)
        self.phase_seconds = clock.seconds
        self.adapter = self._to_adapter(base, trained, {}, adversaries, time.perf_counter() - started)
        return self.adapter

    def _setup(self, embedder: TextEmbedder, clock: PhaseClock) -> tuple[list[QueryLayer], dict[str, str]]:
        """The query bank and the mined synonyms."""
        with clock("query capture"):
            layers = capture_queries(
                self.unet,
                embedder,
                self.spec.neutral[0],
                self.spec.templates,
                per_layer=self.queries_per_layer,
                seed=self.seed,
            )
        with clock("mining"):
            mined = (
                mine_synonyms(
                    embedder, layers, self.spec, per_concept=self.mined_synonyms, pool=self.mining_pool,
                    dictionary=self.dictionary,
                )
                if self.mined_synonyms
                else {}
            )
            # phrases found by coordinate search join the mined words (erased in the same way)
            self.searched = search_phrases(
                embedder, layers, self.spec, per_concept=self.search_phrases, seed=self.seed
            )
        return layers, {**mined, **self.searched}

    def _training_set(
        self, embedder: TextEmbedder, layers: list[QueryLayer], mined: dict[str, str]
    ) -> TrainingSet:
        """The user's erase pairs, the augmentations' (mined words, user synonyms; adversaries join
        later) and the keep prompts, with what is computed once for them."""
        targets = TargetBank(embedder, layers)
        given_src, given_tgt = self._pairs(embedder, self.spec.concepts, targets)
        augmented = list(mined) + self.synonyms
        extra_src, extra_tgt = (
            self._pairs(embedder, augmented, targets, mined) if augmented else (given_src[:0], given_tgt[:0])
        )
        keep = self._keep_prompts(embedder)
        adversary_rows = self.steps // self.adversarial_every + 1 if self.adversarial else 0
        kept = kept_projections(
            layers, len(given_src) + len(extra_src) + adversary_rows + len(keep), keep.shape[1]
        )
        return TrainingSet(
            targets,
            PromptPool(layers, given_src, kept),
            given_tgt,
            PromptPool(layers, extra_src, kept),
            extra_tgt,
            PromptPool(layers, keep, kept),
            unedited_outputs(layers, keep),
        )

    def _step(
        self, data: TrainingSet, layers: list[QueryLayer], params: dict, optimizer: Any
    ) -> torch.Tensor:
        """One optimiser step. The user's words and the augmentations fill half of every erase batch
        each (many augmentations must never crowd out the concept itself); keep prompts fill a batch of
        the same size. Returns ``(loss, erase loss, keep loss)``, detached and still on the device: no
        host-device synchronisation per step."""
        idx_g, idx_x = self._erase_batch(len(data.given), len(data.extra))
        idx_k = torch.randint(len(data.keep), (min(self.batch_size, len(data.keep)),))
        loss_erase, loss_keep = data.losses(layers, params, idx_g, idx_x, idx_k)
        loss = loss_erase + self.preserve_weight * loss_keep
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return torch.stack([loss, loss_erase, loss_keep]).detach()

    def record_losses(self, pending: list[torch.Tensor], bar: Any, *, final: bool = False) -> None:
        """Read the losses of the ``pending`` steps back in one transfer (every :data:`LOSS_READ_EVERY`
        steps, and at the end with ``final``), record them and stop a diverged fit, naming its first
        non-finite step."""
        if not pending or (len(pending) < LOSS_READ_EVERY and not final):
            return
        losses = torch.stack(pending).cpu().tolist()
        pending.clear()
        for total, _, _ in losses:
            self.history.append(total)
            if not math.isfinite(total):
                raise ACEValueError(
                    f"Training diverged at step {len(self.history)} of {self.steps} (loss {total}): "
                    f"learning_rate={self.learning_rate:g} is too large for this model. Try 2e-3 (the "
                    "default) or lower; the closed-form adapter is unaffected."
                )
        bar.set_postfix(erase=f"{losses[-1][1]:.4f}", keep=f"{losses[-1][2]:.4f}")

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
        targets: TargetBank,
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

    def _paired(self, concept: str) -> list[str]:
        """The closed form's paired templates of ``concept`` ("X and Y"): the other thing must stay."""
        count = context_count(FitSettings(), len(self.spec.concepts))
        return context_templates(self.spec, concept, count, start=self.spec.concepts.index(concept))

    def _keep_prompts(self, embedder: TextEmbedder) -> torch.Tensor:
        """Unrelated and preservation prompts, and the paired prompts with the anchor in the concept's
        place (what the other thing of a paired prompt looks like when nothing is to be erased)."""
        anchor_of = dict(zip(self.spec.concepts, self.spec.neutral, strict=True))
        paired = [
            normalize_prompt(filled(t, anchor_of[c])) for c in self.spec.concepts for t in self._paired(c)
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
        source = soft_adversary(
            embedder,
            layers,
            detached(params),
            prompt,
            (template.index("{}"), concept),
            radius=self.adversarial_radius,
            steps=self.adversarial_steps,
        )
        if source is None:
            return None
        return source, normalize_prompt(filled(template, self.spec.neutral[concept_index]))

    def _to_adapter(self, base: ACEAdapter, trained: dict, mined: dict, adversaries: int, seconds: float):
        """The fine-tuned adapter: ``trained`` factors (copied, without gradients) and the fit record."""
        layers = {
            name: LayerFactors(**{key: getattr(factors, key).detach().clone() for key in TENSOR_KEYS})
            for name, factors in trained.items()
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
            "adversaries_kind": "stream rows per block" if self.joint else "input token embeddings",
            "mined_synonyms": [w for w in mined if w not in self.searched],
            "dictionary": self.dictionary and self.mined_synonyms > 0 and not self.joint,  # split words mined
            "searched_phrases": list(self.searched),
            "concept_vectors": self.concept_vectors,
            "user_synonyms": self.synonyms,
            "preserve_weight": self.preserve_weight,
            "seed": self.seed,
            "erase_loss_before": self.initial_loss,
            "erase_loss_after": self.final_loss,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
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
            pooled=base.pooled,  # the closed form's pooled edit (SDXL), kept as fitted
        )
