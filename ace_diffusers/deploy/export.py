"""Export an ACE adapter as a plain LoRA file: diffusers/PEFT format or kohya format (safetensors only).

A LoRA has no gate, so something is lost (see ``docs/deploy.md``). Two modes:

* ``"baked"`` (default): the plain low-rank edit of :func:`ace_diffusers.deploy.bake.bake` — the least-squares
  ungated edit that best reproduces the gated one over the adapter's concept / neutral / preservation
  prompt tokens, i.e. the gate applied *on average*. It is exactly what ``fuse_ace_adapter`` writes
  into the weights, so loading the file with ``pipe.load_lora_weights`` (scale 1) behaves like the
  fused pipeline. Needs the base pipeline's text encoder(s) to compute the token set.
* ``"ungated"``: the adapter's own factors ``s·B``, ``A``, applied to *every* token (gate dropped). No
  text encoder needed, but unrelated prompts are edited as much as the concept (usually much worse).

Key formats (``format=`` names the layout or the tool that loads it, :data:`TOOL_FORMATS`):

* ``diffusers-lora``: ``unet.<layer>.to_k.lora_A.weight`` (r, d_text) and ``...lora_B.weight``
  (d_k, r), same for ``to_v``; the LoRA config (``r``, ``lora_alpha = r``, so scaling 1) goes into the
  safetensors metadata key ``lora_adapter_metadata`` as diffusers' own ``save_lora_weights`` does.
* ``kohya``: ``lora_unet_<layer with '_' for '.'>_to_k.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (= r, so scaling 1). Block names are the diffusers ones (what kohya uses for SD 1.x/2.x
  UNets); SDXL kohya files from kohya's own trainer use SGM block names instead, which diffusers also
  reads, but other tools may expect them. ComfyUI and AUTOMATIC1111 read this layout (and no PEFT
  key of an SD UNet), so it is the command line's default.
* An adapter with a pooled-embedding edit (SDXL) adds one module, ``add_embedding.linear_1`` (kohya: its
  original-UNet name ``label_emb.0.0``, which diffusers' kohya reader maps back), carrying that edit
  with its gate dropped (:func:`pooled_lora_factors`).

diffusers' ``pipe.load_lora_weights`` logs "No LoRA keys associated to CLIPTextModel" for every
UNet-only LoRA (its text-encoder step finds nothing); ``pipe.unet.load_lora_adapter(path,
prefix="unet", adapter_name=...)`` loads a ``diffusers-lora`` export without that step and without the
message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_save_safetensors
from ..core.adapter import ACEAdapter
from ..core.factors import PROJECTIONS
from ..errors import ACEValueError
from ..integration.attach import adapter_scale, loaded_adapters, single_loaded_adapter
from ..integration.modules import (
    cross_attention_modules,
    find_denoiser,
    get_unet,
    kv_projection_names,
    pooled_embedding_module,
    pooled_module_name,
    projection_weight,
)
from ..version import __version__
from .bake import BakedEdit, BakeSettings, bake, check_weight_editable
from .fuse import fused_state

FORMATS = ("diffusers-lora", "kohya")  # the two key layouts written
# ``format=`` may name the tool instead of the layout. Which layout each tool reads (from each tool's
# published key rules; docs/deploy.md has the table and how each was verified):
TOOL_FORMATS: dict[str, str] = {
    "diffusers": "diffusers-lora",  # diffusers/PEFT: unet.<module>.lora_A/lora_B (reads kohya too)
    "diffusers-lora": "diffusers-lora",
    "kohya": "kohya",  # kohya-ss sd-scripts: lora_unet_<module with _>.lora_down/lora_up/alpha
    "comfyui": "kohya",  # ComfyUI's LoRA loader matches no PEFT key of an SD UNet, every kohya one
    "a1111": "kohya",  # AUTOMATIC1111 webui: converts lora_unet_down_blocks_... names to its own
}
CLI_DEFAULT_FORMAT = "kohya"  # the layout every one of these tools loads
MODES = ("baked", "ungated")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _plain_factors(
    adapter: ACEAdapter,
    pipe: Any,
    *,
    mode: str,
    rank: int | None,
    scale: float,
    settings: BakeSettings | None,
    baked: BakedEdit | None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], BakedEdit | None]:
    """``({layer: {"k"|"v": (down, up)}}, baked edit or None)`` of the plain LoRA to write."""
    if mode not in MODES:
        raise ACEValueError(f"Unknown export mode {mode!r}; choose one of {list(MODES)}.")
    check_weight_editable(adapter, pipe)
    if mode == "ungated":
        out = {}
        for name, f in adapter.layers.items():
            out[name] = {}
            for proj in PROJECTIONS:
                down = getattr(f, f"{proj}_down").detach().cpu().float()
                up = getattr(f, f"{proj}_up").detach().cpu().float() * float(scale)
                if rank is not None and rank < down.shape[0]:
                    u, s, vh = torch.linalg.svd(up.double() @ down.double(), full_matrices=False)
                    down, up = vh[:rank].float(), (u[:, :rank] * s[:rank]).float()
                out[name][proj] = (down, up)
        return out, None
    if baked is None:
        if pipe is None:
            raise ACEValueError(
                "Exporting the baked edit needs the base pipeline (its text encoder gives the prompt tokens "
                "the "
                "gate is averaged over): pass pipe=..., or mode='ungated' to drop the gate instead."
            )
        settings = settings or BakeSettings()
        if rank is not None:
            settings = BakeSettings(**{**settings.to_dict(), "rank": rank})
        baked = bake(pipe, adapter, scale=scale, settings=settings)
    elif rank is not None and rank != baked.rank:
        raise ACEValueError(
            f"rank={rank} conflicts with the given baked edit of rank {baked.rank}; pass one of them."
        )
    return {
        name: {proj: layer.factors(proj) for proj in PROJECTIONS} for name, layer in baked.layers.items()
    }, baked


def denoiser_prefix(adapter: ACEAdapter, pipe: Any, format: str) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline attribute of the model the adapter edits (from ``pipe``,
    else from the adapter's layer names: a transformer's are ``transformer_blocks.*``); refuses the kohya
    layout, which names UNet modules only, for a transformer."""
    model = find_denoiser(pipe) if pipe is not None else None
    if model is not None:
        transformer = getattr(pipe, "transformer", None) is model
    else:
        transformer = all(n.startswith("transformer_blocks.") for n in adapter.layers)
    if transformer and format == "kohya":
        raise ACEValueError(
            "The kohya layout names UNet modules (lora_unet_...); this adapter is for a transformer "
            "(PixArt, Sana). Export it with format='diffusers' (docs/guides/models.md shows how to load it)."
        )
    return "transformer" if transformer else "unet"


def projection_names(layer: str, pipe: Any) -> tuple[str, str]:
    """The K/V projection modules of ``layer``: from the pipeline's model when given, else from diffusers'
    naming (SD3's joint attention is a block's ``attn``, cross-attention is ``attn2``)."""
    model = find_denoiser(pipe) if pipe is not None else None
    if model is not None:
        return kv_projection_names(cross_attention_modules(model)[layer])
    return ("add_k_proj", "add_v_proj") if layer.endswith(".attn") else ("to_k", "to_v")


# kohya names SDXL's added-conditioning MLP as the original (SGM) UNet does; diffusers' kohya reader maps
# "label_emb.0.0" back to add_embedding.linear_1 and drops a diffusers-spelled key
KOHYA_NAMES = {"add_embedding.linear_1": "label_emb.0.0"}


def pooled_lora_factors(
    adapter: ACEAdapter, pipe: Any, *, scale: float, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(down, up)`` of the LoRA on the first layer that reads the pooled embedding (SDXL's
    ``add_embedding.linear_1`` reads ``[p, t]``, SD3's ``time_text_embed.text_embedder.linear_1`` ``p``):
    ``W[:, :d] (p + s·B_p A_p p)`` adds ``(W[:, :d] s·B_p) (A_p p)``, so ``down = [A_p, 0]`` and
    ``up = W[:, :d] s·B_p`` (the gate dropped, as fusing does). None without a pooled edit."""
    if adapter.pooled is None:
        return None
    model = find_denoiser(pipe) if pipe is not None else None
    module = pooled_embedding_module(model) if model is not None else None
    if module is None:
        raise ACEValueError(
            "This adapter also edits the pooled text embedding (SDXL, SD3), and a LoRA carries that edit "
            "on the layer that reads it (SDXL: add_embedding.linear_1), whose weights the export needs: "
            "pass the pipeline it was fitted for (pipe=...)."
        )
    state = fused_state(get_unet(pipe))  # a fused pipeline's weight already carries the edit
    original = state.pooled_original if state is not None else None
    weight = original if original is not None else projection_weight(module.linear_1).detach()
    weight = weight.cpu().double()
    dim = adapter.pooled.dim
    down = torch.zeros(adapter.pooled.rank, weight.shape[1], dtype=torch.float64)
    down[:, :dim] = adapter.pooled.p_down.detach().cpu().double()
    up = weight[:, :dim] @ adapter.pooled.p_up.detach().cpu().double() * float(scale)
    if rank is not None and rank < down.shape[0]:
        u, s, vh = torch.linalg.svd(up @ down, full_matrices=False)
        down, up = vh[:rank], u[:, :rank] * s[:rank]
    return down.float(), up.float()


def _module_tensors(
    module: str, down: torch.Tensor, up: torch.Tensor, format: str, rank: int, prefix: str
) -> dict[str, torch.Tensor]:
    """One module's LoRA tensors in ``format``'s key layout (``prefix``: the denoiser's pipeline name)."""
    down, up = down.contiguous(), up.contiguous()
    if format == "diffusers-lora":
        return {f"{prefix}.{module}.lora_A.weight": down, f"{prefix}.{module}.lora_B.weight": up}
    key = "lora_unet_" + KOHYA_NAMES.get(module, module).replace(".", "_")
    alpha = torch.tensor(float(rank), dtype=down.dtype)
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": alpha}


def _pad(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to ``rank`` so every module has the same rank (one LoRA config, scaling 1)."""
    missing = rank - down.shape[0]
    if missing > 0:
        down = torch.cat([down, down.new_zeros(missing, down.shape[1])])
        up = torch.cat([up, up.new_zeros(up.shape[0], missing)], dim=1)
    return down, up


def lora_state_dict(
    adapter: ACEAdapter,
    pipe: Any = None,
    *,
    format: str = "diffusers-lora",
    mode: str = "baked",
    rank: int | None = None,
    scale: float = 1.0,
    settings: BakeSettings | None = None,
    baked: BakedEdit | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of the exported LoRA (module docstring for formats/modes)."""
    if format not in TOOL_FORMATS:
        raise ACEValueError(
            f"Unknown LoRA format {format!r}; name the tool that will load it, one of {list(TOOL_FORMATS)}."
        )
    format = TOOL_FORMATS[format]
    prefix = denoiser_prefix(adapter, pipe, format)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ACEValueError(f"rank must be a positive integer or None, got {rank!r}.")
    factors, baked = _plain_factors(
        adapter, pipe, mode=mode, rank=rank, scale=scale, settings=settings, baked=baked
    )
    modules = {  # layers the adapter leaves unedited (a FLUX fit without single-stream blocks) get none
        f"{name}.{module}": factors[name][proj]
        for name in sorted(factors)
        if adapter.layers[name].edits()
        for proj, module in zip(PROJECTIONS, projection_names(name, pipe), strict=True)
    }
    pooled = pooled_lora_factors(adapter, pipe, scale=scale, rank=rank)
    if pooled is not None:
        modules[pooled_module_name(get_unet(pipe))] = pooled
    r = max(down.shape[0] for down, _ in modules.values())
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for module, pair in modules.items():
        down, up = _pad(*pair, r)
        tensors.update(_module_tensors(module, down.to(dtype), up.to(dtype), format, r, prefix))
        targets.append(module)

    metadata = {
        "format": "pt",
        "ace_concepts": json.dumps(adapter.concepts),
        "ace_neutral": json.dumps(adapter.neutral),
        "ace_mode": mode,
        "ace_scale": repr(float(scale)),
        "ace_rank": str(r),
        "ace_base_model": adapter.base_model or "",
        "created_with": f"ace-diffusers {__version__}",
    }
    if baked is not None:
        metadata["ace_bake_settings"] = json.dumps(baked.settings.to_dict())
    if format == "diffusers-lora":
        config = {f"{prefix}.r": r, f"{prefix}.lora_alpha": r, f"{prefix}.target_modules": targets}
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    else:
        metadata.update(
            {"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(r)}
        )
    return tensors, metadata


def to_diffusers_lora(adapter: ACEAdapter, pipe: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The adapter as a diffusers/PEFT LoRA state dict (``pipe.load_lora_weights(state_dict)`` reads it).

    ``kwargs``: ``format`` (default ``"diffusers-lora"``), ``mode``, ``rank``, ``scale``, ``settings``,
    ``baked``, ``dtype`` as in :func:`lora_state_dict`.
    """
    return lora_state_dict(adapter, pipe, **kwargs)[0]


def save_lora(adapter: ACEAdapter, path: str | os.PathLike, pipe: Any = None, **kwargs: Any) -> Path:
    """Write the exported LoRA to ``path`` (one ``.safetensors`` file); see :func:`lora_state_dict`."""
    path = Path(path)
    if path.is_dir():
        raise ACEValueError(
            f"'{path}' is a folder; give the LoRA file name, e.g. '{path / 'ace_lora.safetensors'}'."
        )
    tensors, metadata = lora_state_dict(adapter, pipe, **kwargs)
    return atomic_save_safetensors(path, tensors, metadata)


def export_lora(
    pipe: Any,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    format: str = "diffusers-lora",
    mode: str = "baked",
    rank: int | None = None,
    settings: BakeSettings | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Export a loaded ACE adapter (at its current scale) as a plain LoRA file for ``pipe``'s base model.

    If the adapter is fused, the exact edit that was fused is written (unless ``rank`` asks otherwise).
    """
    unet = get_unet(pipe)
    name = single_loaded_adapter(unet, adapter_name)
    adapter = loaded_adapters(unet)[name]
    state = fused_state(unet)
    baked = None
    if mode == "baked" and state is not None and name in state.adapters and rank is None and settings is None:
        baked = state.adapters[name].baked
    scale = baked.scale if baked is not None else adapter_scale(unet, name)
    return save_lora(
        adapter,
        path,
        pipe,
        format=format,
        mode=mode,
        rank=rank,
        scale=scale,
        settings=settings,
        baked=baked,
        dtype=dtype,
    )
