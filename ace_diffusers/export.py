"""Export an ACE adapter as a plain LoRA file: diffusers/PEFT format or kohya format (safetensors only).

A LoRA has no gate, so something is lost (see ``docs/deploy.md``). Two modes:

* ``"baked"`` (default): the plain low-rank edit of :func:`ace_diffusers.fuse.bake` — the least-squares
  ungated edit that best reproduces the gated one over the adapter's concept / neutral / preservation
  prompt tokens, i.e. the gate applied *on average*. It is exactly what ``fuse_ace_adapter`` writes
  into the weights, so loading the file with ``pipe.load_lora_weights`` (scale 1) behaves like the
  fused pipeline. Needs the base pipeline's text encoder(s) to compute the token set.
* ``"ungated"``: the adapter's own factors ``s·B``, ``A``, applied to *every* token (gate dropped). No
  text encoder needed, but unrelated prompts are edited as much as the concept (usually much worse).

Key formats (read by diffusers' ``load_lora_weights``; learned from ``diffusers.loaders``):

* ``diffusers-lora``: ``unet.<layer>.to_k.lora_A.weight`` (r, d_text) and ``...lora_B.weight``
  (d_k, r), same for ``to_v``; the LoRA config (``r``, ``lora_alpha = r``, so scaling 1) goes into the
  safetensors metadata key ``lora_adapter_metadata`` as diffusers' own ``save_lora_weights`` does.
* ``kohya``: ``lora_unet_<layer with '_' for '.'>_to_k.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (= r, so scaling 1). Block names are the diffusers ones (what kohya uses for SD 1.x/2.x
  UNets); SDXL kohya files from kohya's own trainer use SGM block names instead, which diffusers also
  reads, but other tools may expect them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter import ACEAdapter
from .errors import ACEValueError
from .fuse import PROJECTIONS, BakedEdit, BakeSettings, bake

FORMATS = ("diffusers-lora", "kohya")
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
                "Exporting the baked edit needs the base pipeline (its text encoder gives the prompt tokens the "
                "gate is averaged over): pass pipe=..., or mode='ungated' to drop the gate instead."
            )
        settings = settings or BakeSettings()
        if rank is not None:
            settings = BakeSettings(**{**settings.to_dict(), "rank": rank})
        baked = bake(pipe, adapter, scale=scale, settings=settings)
    elif rank is not None and rank != baked.rank:
        raise ACEValueError(f"rank={rank} conflicts with the given baked edit of rank {baked.rank}; pass one of them.")
    return {name: {proj: layer.factors(proj) for proj in PROJECTIONS} for name, layer in baked.layers.items()}, baked


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
    if format not in FORMATS:
        raise ACEValueError(f"Unknown LoRA format {format!r}; choose one of {list(FORMATS)}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ACEValueError(f"rank must be a positive integer or None, got {rank!r}.")
    factors, baked = _plain_factors(adapter, pipe, mode=mode, rank=rank, scale=scale, settings=settings, baked=baked)
    r = max(down.shape[0] for layer in factors.values() for down, _ in layer.values())
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for name in sorted(factors):
        for proj in PROJECTIONS:
            down, up = _pad(*factors[name][proj], r)
            down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
            if format == "diffusers-lora":
                module = f"{name}.to_{proj}"
                targets.append(module)
                tensors[f"unet.{module}.lora_A.weight"] = down
                tensors[f"unet.{module}.lora_B.weight"] = up
            else:
                module = "lora_unet_" + f"{name}.to_{proj}".replace(".", "_")
                tensors[f"{module}.lora_down.weight"] = down
                tensors[f"{module}.lora_up.weight"] = up
                tensors[f"{module}.alpha"] = torch.tensor(float(r), dtype=dtype)
    from . import __version__

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
        config = {"unet.r": r, "unet.lora_alpha": r, "unet.target_modules": targets}
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    else:
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(r)})
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
        raise ACEValueError(f"'{path}' is a folder; give the LoRA file name, e.g. '{path / 'ace_lora.safetensors'}'.")
    tensors, metadata = lora_state_dict(adapter, pipe, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    from . import attach
    from .fuse import _single_loaded, _state
    from .pipeline import get_unet

    unet = get_unet(pipe)
    name = _single_loaded(unet, adapter_name)
    adapter = attach.loaded_adapters(unet)[name]
    state = _state(unet)
    baked = None
    if mode == "baked" and state is not None and name in state.adapters and rank is None and settings is None:
        baked = state.adapters[name].baked
    scale = baked.scale if baked is not None else attach.adapter_scale(unet, name)
    return save_lora(
        adapter, path, pipe, format=format, mode=mode, rank=rank, scale=scale, settings=settings, baked=baked, dtype=dtype
    )


# ---------------------------------------------------------------------- command line
def _load_text_pipeline(base: str, adapter: ACEAdapter) -> Any:
    """The base pipeline with only its tokenizer(s) and text encoder(s) loaded; checks the architecture."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from .attach import layer_shapes

    config = DiffusionPipeline.load_config(base)
    keep = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}
    skip = {k: None for k, v in config.items() if isinstance(v, (list, tuple)) and len(v) == 2 and k not in keep}
    if "requires_safety_checker" in config:
        skip["requires_safety_checker"] = False
    if isinstance(config.get("unet"), (list, tuple)) and config["unet"][0] is not None:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
        adapter.check_compatible(layer_shapes(unet))
    return DiffusionPipeline.from_pretrained(base, **skip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ace-diffusers export",
        description="Export an ACE adapter as a plain LoRA safetensors file that diffusers' load_lora_weights "
        "(and kohya-format readers) load without ace-diffusers. The gate is lost: see docs/deploy.md.",
    )
    parser.add_argument("--adapter", required=True, help="ACE adapter folder or Hub repo id")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--format", choices=FORMATS, default="diffusers-lora")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="baked",
        help="baked (default): least-squares ungated edit over the adapter's prompts (needs the base model); "
        "ungated: the adapter's factors applied to every token",
    )
    parser.add_argument("--base", help="base pipeline (folder or repo id); default: the adapter's recorded base_model")
    parser.add_argument("--rank", type=int, help="truncate the exported edit to this rank")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter scale to export at (default 1.0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--other-weight", type=float, default=BakeSettings.other_weight,
                        help="baked mode: weight of non-concept tokens in the least-squares fit")
    parser.add_argument("--ridge", type=float, default=BakeSettings.ridge, help="baked mode: relative ridge")
    args = parser.parse_args(argv)

    from .errors import ACEError

    try:
        adapter = ACEAdapter.from_pretrained(args.adapter)
        pipe = None
        if args.mode == "baked":
            base = args.base or adapter.base_model
            if not base:
                raise ACEValueError(
                    "The adapter records no base model; pass --base MODEL (folder or repo id) for the baked "
                    "export, or --mode ungated."
                )
            pipe = _load_text_pipeline(base, adapter)
        settings = BakeSettings(other_weight=args.other_weight, ridge=args.ridge)
        path = save_lora(
            adapter,
            args.output,
            pipe,
            format=args.format,
            mode=args.mode,
            rank=args.rank,
            scale=args.scale,
            settings=settings,
            dtype=DTYPES[args.dtype],
        )
    except (ACEError, OSError) as err:
        print(f"ace-diffusers export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.format}, {args.mode}, concepts {adapter.concepts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
