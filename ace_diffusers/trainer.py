"""``ACETrainer``: ACE's second stage — adversarially augmented fine-tuning of the closed-form adapter.

The closed form erases the words it was shown. Fine-tuning makes the erasure general:

1. **Initialise** every layer's factors and the gate from :func:`closed_form.fit_adapter`.
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
   concept's) join the prompts to erase — found from the model alone, never from a synonym list. (b) *Embedding-space adversaries*: every few steps a few gradient steps on soft input
   embeddings that replace the concept's tokens look for the input whose *edited* attention output is
   closest to the *original* concept's (i.e. that slips through the current adapter); the result is
   fed back as a training prompt with the neutral target (AdvUnlearn/RECE-style).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import attach
from .adapter import ACEAdapter, LayerFactors
from .closed_form import FitSettings, fit_adapter
from .errors import ACEValueError
from .pipeline import get_unet
from .presets import resolve_spec
from .text import TextEmbedder

MINED_MIN_SHIFT = 0.4  # a mined word must move attention at least this far towards the concept
MAX_DEFAULT_STEPS = 2000


def default_steps(n_concepts: int) -> int:
    """450 for one concept, +50 per extra concept, at most 2000.

    Each step draws a fixed-size batch, so every concept of a multi-concept adapter is seen less often
    per step. On the miniature world (``ace-diffusers bench trainer``, 4 images per prompt) 300 steps
    left held-out synonyms of *cross* at 18.8 % Acc_g and of *square* in a 4-concept adapter at 18.8 %;
    450 and 600 steps brought them to 12.5 % and 3.1 %.
    """
    return min(450 + 50 * (n_concepts - 1), MAX_DEFAULT_STEPS)


@dataclass
class _Layer:
    name: str
    attn: torch.nn.Module
    queries: torch.Tensor  # (n_queries, heads, head_dim)


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
        self.synonyms = [s for s in (synonyms or []) if isinstance(s, str) and s.strip()]
        if synonyms is not None and len(self.synonyms) != len(synonyms):
            raise ACEValueError("synonyms must be a list of non-empty strings.")
        self.rank = rank
        self.steps = default_steps(len(self.spec.concepts)) if steps is None else _positive_int(steps, "steps", minimum=0)
        self.learning_rate = _positive_float(learning_rate, "learning_rate")
        self.adversarial = bool(adversarial)
        self.adversarial_every = _positive_int(adversarial_every, "adversarial_every")
        self.adversarial_steps = _positive_int(adversarial_steps, "adversarial_steps")
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
        base = fit_adapter(self.pipe, self.spec, FitSettings(rank=self.rank))
        layers = self._query_bank()
        params = self._parameters(base)
        mined = self._mine_synonyms(embedder, layers) if self.mined_synonyms else {}

        # The user's words and the augmentations (mined words, user synonyms, adversaries) fill half of
        # every erase batch each: many augmentations must never crowd out the concept itself.
        given_src, given_tgt = self._pairs(embedder, self.spec.concepts)
        augmented = list(mined) + self.synonyms
        extra_src, extra_tgt = self._pairs(embedder, augmented, mined) if augmented else (given_src[:0], given_tgt[:0])
        keep = self._keep_prompts(embedder)
        fixed_src, fixed_tgt = torch.cat([given_src, extra_src]), torch.cat([given_tgt, extra_tgt])
        with torch.no_grad():
            self.initial_loss = float(self._alignment(layers, params, fixed_src, fixed_tgt))
        optimizer = torch.optim.Adam([p for group in params.values() for p in group.values()], lr=self.learning_rate)
        adversaries = 0
        bar = tqdm(range(self.steps), desc="ACE fine-tuning", disable=not self.progress, leave=False)
        for step in bar:
            if self.time_budget is not None and time.perf_counter() - started > self.time_budget:
                break
            if self.adversarial and step % self.adversarial_every == 0:
                found = self._adversary(embedder, layers, params, rng)
                if found is not None:
                    extra_src = torch.cat([extra_src, found[0]])
                    extra_tgt = torch.cat([extra_tgt, found[1]])
                    adversaries += 1
            half = self.batch_size // 2 if len(extra_src) else self.batch_size
            idx_g = torch.randint(len(given_src), (min(half, len(given_src)),))
            batch_src, batch_tgt = given_src[idx_g], given_tgt[idx_g]
            if len(extra_src):
                idx_x = torch.randint(len(extra_src), (min(self.batch_size - half, len(extra_src)),))
                batch_src, batch_tgt = torch.cat([batch_src, extra_src[idx_x]]), torch.cat([batch_tgt, extra_tgt[idx_x]])
            idx_k = torch.randint(len(keep), (min(self.batch_size, len(keep)),))
            loss_erase = self._alignment(layers, params, batch_src, batch_tgt)
            loss_keep = self._alignment(layers, params, keep[idx_k], keep[idx_k])
            loss = loss_erase + self.preserve_weight * loss_keep
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.history.append(float(loss.detach()))
            bar.set_postfix(erase=f"{loss_erase.item():.4f}", keep=f"{loss_keep.item():.4f}")
        bar.close()
        with torch.no_grad():
            self.final_loss = float(self._alignment(layers, params, fixed_src, fixed_tgt))

        self.adapter = self._to_adapter(base, params, mined, adversaries, time.perf_counter() - started)
        return self.adapter

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
        self, embedder: TextEmbedder, phrases: list[str], source_of: dict[str, str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts with each phrase and with its concept's anchor; ``source_of`` maps a mined word to
        the concept it was mined for (its templates and anchor are used)."""
        anchor_of = dict(zip(self.spec.concepts, self.spec.neutral, strict=True))
        source_of = source_of or {}
        src, tgt = [], []
        for phrase in phrases:
            concept = source_of.get(phrase, phrase if phrase in anchor_of else self.spec.concepts[0])
            for template in self.spec.templates_for(concept):
                src.append(template.replace("{}", phrase))
                tgt.append(" ".join(template.replace("{}", anchor_of[concept]).split()))
        return self._encode(embedder, src), self._encode(embedder, tgt)

    def _keep_prompts(self, embedder: TextEmbedder) -> torch.Tensor:
        return self._encode(embedder, self.spec.unrelated_prompts() + self.spec.preserve_prompts())

    @staticmethod
    def _encode(embedder: TextEmbedder, prompts: list[str]) -> torch.Tensor:
        return torch.stack([e.embeddings for e in embedder.encode(prompts, extra_pad_tokens=None)])

    def _mine_synonyms(self, embedder: TextEmbedder, layers: list[_Layer]) -> dict[str, str]:
        """Vocabulary words the *UNet* reads like the concept; returns {word: the concept it stands in for}.

        Three stages, each cheaper per word than the next: (1) the ``mining_pool`` words whose input
        embedding is closest to the concept's; (2) of those, the ones whose encoded token, projected by
        every cross-attention layer's ``to_k``/``to_v``, points most nearly where the concept's does —
        what the UNet was trained to react to; (3) in the concept's own templates, the attention output
        of the query bank must move from the neutral prompt's towards the concept's by at least
        ``MINED_MIN_SHIFT`` of the concept's own shift, and sit closer to the concept's than to any
        preserved concept's — so synonyms of what must be kept are never erased.
        """
        tokenizer, encoder = embedder.encoders[0]
        table = encoder.get_input_embeddings().weight.detach().float()
        vocab = tokenizer.get_vocab()
        clip_style = any(token.endswith("</w>") for token in vocab)  # BPE marks word ends, WordPiece "##" pieces
        words = {}
        for token, index in vocab.items():
            if clip_style != token.endswith("</w>") or token.startswith("##") or index >= len(table):
                continue
            word = token[:-4] if clip_style else token
            if word.isalpha() and len(word) > 2:
                words[word.lower()] = index
        banned = {w.lower() for phrase in self.spec.concepts + self.spec.preserve + self.spec.neutral for w in phrase.split()}
        projection = torch.cat(
            [attach._weight(layer.attn.to_k).float() for layer in layers]
            + [attach._weight(layer.attn.to_v).float() for layer in layers]
        )
        table_n = F.normalize(table, dim=-1)
        found: dict[str, str] = {}
        for concept_index, concept in enumerate(self.spec.concepts):
            ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            lowered = concept.lower()
            candidates = [w for w in words if w not in banned and w not in lowered and w not in found]
            index = torch.tensor([words[w] for w in candidates])
            sims = table_n[index] @ F.normalize(table[ids].mean(0), dim=-1)
            pool = [candidates[i] for i in sims.topk(min(self.mining_pool, len(candidates))).indices.tolist()]
            # (2) the UNet's view of each word on its own
            encoded = embedder.encode([concept] + pool, [(0, len(concept))] + [(0, len(w)) for w in pool],
                                      extra_pad_tokens=0, batch_size=512, approximate=True)
            tokens = torch.stack([e.embeddings[e.span[0] : e.span[1]].mean(0) for e in encoded])
            keyed = F.normalize(tokens @ projection.T, dim=-1)
            shortlist = [pool[i] for i in (keyed[1:] @ keyed[0]).topk(min(4 * self.mined_synonyms, len(pool))).indices.tolist()]
            if not shortlist:
                continue
            # (3) in context: the attention output must move towards the concept, and not towards a kept one
            templates = self.spec.templates_for(concept)[:2]
            anchors = [concept, self.spec.neutral[concept_index]] + list(self.spec.preserve)
            phrases = anchors + shortlist
            prompts = [" ".join(t.replace("{}", p).split()) for p in phrases for t in templates]
            context = self._encode(embedder, prompts)
            with torch.no_grad():
                signature = torch.cat([self._attention(layer, context, None).flatten(1) for layer in layers], dim=1)
            signature = signature.view(len(phrases), len(templates), -1).flatten(1)
            target, neutral = signature[0], signature[1]
            shift = target - neutral
            alpha = ((signature[len(anchors):] - neutral) @ shift) / shift.dot(shift).clamp_min(1e-12)
            distance = torch.cdist(signature[len(anchors):], signature[: len(anchors)])  # (words, anchors)
            nearest_is_concept = distance.argmin(dim=1) == 0
            ranked = sorted(range(len(shortlist)), key=lambda i: -float(alpha[i]))
            kept = [shortlist[i] for i in ranked if bool(nearest_is_concept[i]) and float(alpha[i]) >= MINED_MIN_SHIFT]
            for word in kept[: self.mined_synonyms]:
                found[word] = concept
        return found

    # ------------------------------------------------------------------ model pieces
    @torch.no_grad()
    def _query_bank(self) -> list[_Layer]:
        """Capture real cross-attention queries: UNet on noised latents, neutral and empty prompts."""
        modules = attach.cross_attention_modules(self.unet)
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        hooks = [
            attn.register_forward_pre_hook(lambda m, args, kwargs, name=name: captured[name].append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
            for name, attn in modules.items()
        ]
        try:
            embedder = TextEmbedder(self.pipe)
            prompts = [""] + [t.replace("{}", self.spec.neutral[0]) for t in self.spec.templates[:3]]
            context = self._encode(embedder, prompts)
            config = self.unet.config
            size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
            size = min(size, 16)
            generator = torch.Generator().manual_seed(self.seed)
            latents = torch.randn(len(prompts), config.in_channels, size, size, generator=generator)
            timesteps = torch.randint(50, 950, (len(prompts),), generator=generator)
            dtype = next(self.unet.parameters()).dtype
            device = next(self.unet.parameters()).device
            kwargs: dict[str, Any] = {}
            if getattr(config, "addition_embed_type", None) == "text_time":
                pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros(len(prompts), pooled_dim, device=device, dtype=dtype),
                    "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * len(prompts), device=device, dtype=dtype),
                }
            self.unet(latents.to(device, dtype), timesteps.to(device), encoder_hidden_states=context.to(device, dtype), **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        layers = []
        for name, attn in modules.items():
            hidden = torch.cat([h.reshape(-1, h.shape[-1]) if h.ndim == 3 else h.flatten(2).transpose(1, 2).reshape(-1, h.shape[1]) for h in captured[name]])
            pick = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(self.seed))[: self.queries_per_layer]
            query = attn.to_q(hidden[pick]).float()
            heads = attn.heads
            layers.append(_Layer(name, attn, query.reshape(len(pick), heads, -1)))
        return layers

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

    def _attention(self, layer: _Layer, context: torch.Tensor, params: dict | None) -> torch.Tensor:
        """Attention output of the layer's query bank over ``context`` (B, T, d): (B, n_q, d_v)."""
        attn = layer.attn
        weight_k = attach._weight(attn.to_k).float()
        weight_v = attach._weight(attn.to_v).float()
        key = context @ weight_k.T
        value = context @ weight_v.T
        if params is not None:
            gate = torch.sigmoid(context @ params["gate"]["weight"] + params["gate"]["bias"]).unsqueeze(-1)
            p = params[layer.name]
            key = key + gate * ((context @ p["k_down"].T) @ p["k_up"].T)
            value = value + gate * ((context @ p["v_down"].T) @ p["v_up"].T)
        batch, tokens, _ = key.shape
        heads = layer.queries.shape[1]
        key = key.view(batch, tokens, heads, -1).transpose(1, 2)
        value = value.view(batch, tokens, heads, -1).transpose(1, 2)
        query = layer.queries.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(batch, out.shape[2], -1)

    def _alignment(self, layers: list[_Layer], params: dict, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = source.new_zeros(())
        for layer in layers:
            with torch.no_grad():
                wanted = self._attention(layer, target, None)
            got = self._attention(layer, source, params)
            total = total + ((got - wanted) ** 2).mean() / wanted.pow(2).mean().clamp_min(1e-8)
        return total / len(layers)

    def _adversary(self, embedder: TextEmbedder, layers: list[_Layer], params: dict, rng: random.Random):
        """Soft input embeddings for the concept's tokens that make the *edited* model attend like the
        *original* model does to the concept; returns (source, neutral target) embeddings or None."""
        concept_index = rng.randrange(len(self.spec.concepts))
        concept = self.spec.concepts[concept_index]
        template = rng.choice(self.spec.templates_for(concept))
        prompt = template.replace("{}", concept)
        start = template.index("{}")
        tokenizer, encoder = embedder.encoders[0]
        tokens = tokenizer(prompt, padding="max_length", max_length=embedder.max_length, truncation=True,
                           return_tensors="pt", return_offsets_mapping=True)
        offsets = tokens["offset_mapping"][0]
        span = [t for t in range(len(offsets)) if offsets[t][1] > offsets[t][0] and offsets[t][0] < start + len(concept) and offsets[t][1] > start]
        if not span or len(embedder.encoders) != 1:
            return None
        with torch.no_grad():
            original = self._encode(embedder, [prompt])
            wanted = [self._attention(layer, original, None) for layer in layers]
        embedding_module = encoder.get_input_embeddings()
        init = embedding_module(tokens["input_ids"][:, span]).detach().float()
        soft = (init + 0.1 * init.norm(dim=-1, keepdim=True) * torch.randn_like(init) / math.sqrt(init.shape[-1])).requires_grad_(True)
        radius = 0.5 * init.norm(dim=-1, keepdim=True)
        optimizer = torch.optim.Adam([soft], lr=0.05 * float(init.norm(dim=-1).mean()))

        def replace(module, args, output):
            output = output.clone()
            output[:, span] = soft.to(output.dtype)
            return output

        handle = embedding_module.register_forward_hook(replace)
        try:
            for _ in range(self.adversarial_steps):
                context = self._run_encoder(embedder, tokens["input_ids"])
                loss = sum(((self._attention(layer, context, _detached(params)) - w) ** 2).mean() / w.pow(2).mean() for layer, w in zip(layers, wanted, strict=True))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # stay near the concept's own embedding
                    delta = soft - init
                    soft.copy_(init + delta * torch.clamp(radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-8), max=1.0))
            with torch.no_grad():
                source = self._run_encoder(embedder, tokens["input_ids"])
        finally:
            handle.remove()
        target_prompt = " ".join(template.replace("{}", self.spec.neutral[concept_index]).split())
        return source.detach(), self._encode(embedder, [target_prompt])

    @staticmethod
    def _run_encoder(embedder: TextEmbedder, input_ids: torch.Tensor) -> torch.Tensor:
        _, encoder = embedder.encoders[0]
        return embedder._run(encoder, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, input_ids.shape[1])

    def _to_adapter(self, base: ACEAdapter, params: dict, mined: dict[str, str], adversaries: int, seconds: float) -> ACEAdapter:
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
            "mined_synonyms": list(mined),
            "user_synonyms": self.synonyms,
            "preserve_weight": self.preserve_weight,
            "seed": self.seed,
            "erase_loss_before": self.initial_loss,
            "erase_loss_after": self.final_loss,
        }
        fit["seconds"] = round(seconds, 3)
        return ACEAdapter(layers, concepts=base.concepts, neutral=base.neutral, kind=base.kind, method="ace",
                          fit=fit, base_model=base.base_model)


def _detached(params: dict) -> dict:
    return {group: {k: v.detach() for k, v in values.items()} for group, values in params.items()}
