"""``ace-diffusers export``: write an ACE adapter as a plain LoRA file (diffusers/PEFT or kohya format).

diffusers' load_lora_weights (and kohya-format readers such as ComfyUI's LoRA loader) load the file
without ace-diffusers. The gate is lost: see docs/deploy.md.

Examples::

    ace-diffusers export --adapter ./erase-circle --output circle-lora.safetensors
    ace-diffusers export --adapter ./erase-van-gogh --format kohya --output van-gogh-kohya.safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from .. import helptext
from ..core.adapter import ACEAdapter
from ..deploy.bake import BakeSettings
from ..deploy.export import CLI_DEFAULT_FORMAT, DTYPES, MODES, TOOL_FORMATS, save_lora
from ..errors import ACEError, ACEValueError
from ..integration.attach import materialized
from ..integration.modules import get_unet, layer_shapes


def _load_text_pipeline(base: str, adapter: ACEAdapter) -> Any:
    """The base pipeline with only its tokenizer(s) and text encoder(s) loaded; checks the architecture.
    An adapter with a pooled edit (SDXL, SD3), joint-attention layers (SD3) or stored in text-space form
    needs the denoiser's weights too (the pooled LoRA module's weight; each block's text stream; the K/V
    weights its factors are rebuilt from): then the whole pipeline is loaded."""
    if (
        adapter.pooled is not None
        or adapter.pending
        or any(name.endswith(".attn") for name in adapter.shapes)
    ):
        pipe = DiffusionPipeline.from_pretrained(base)
        adapter.check_compatible(layer_shapes(get_unet(pipe)))
        return pipe
    config = DiffusionPipeline.load_config(base)
    keep = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}
    skip = {
        k: None for k, v in config.items() if isinstance(v, (list, tuple)) and len(v) == 2 and k not in keep
    }
    if "requires_safety_checker" in config:
        skip["requires_safety_checker"] = False
    if isinstance(config.get("unet"), (list, tuple)) and config["unet"][0] is not None:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
        adapter.check_compatible(layer_shapes(unet))
    return DiffusionPipeline.from_pretrained(base, **skip)


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("export", __doc__)
    parser.add_argument("--adapter", required=True, help="ACE adapter folder or Hub repo id")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument(
        "--format",
        choices=list(TOOL_FORMATS),
        default=CLI_DEFAULT_FORMAT,
        help="the tool that will load the file (comfyui, a1111, kohya: kohya keys; diffusers: PEFT keys); "
        f"default {CLI_DEFAULT_FORMAT}, which all of them load",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="baked",
        help="baked (default): least-squares ungated edit over the adapter's prompts (needs the base model); "
        "ungated: the adapter's factors applied to every token",
    )
    parser.add_argument(
        "--base", help="base pipeline (folder or repo id); default: the adapter's recorded base_model"
    )
    parser.add_argument("--rank", type=int, help="truncate the exported edit to this rank")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter scale to export at (default 1.0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--other-weight",
        type=float,
        default=BakeSettings.other_weight,
        help="baked mode: weight of non-concept tokens in the least-squares fit",
    )
    parser.add_argument("--ridge", type=float, default=BakeSettings.ridge, help="baked mode: relative ridge")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        adapter = ACEAdapter.from_pretrained(args.adapter)
        pipe = None
        if args.mode == "baked" or adapter.pending:
            base = args.base or adapter.base_model
            if not base:
                raise ACEValueError(
                    "The adapter records no base model; pass --base MODEL (folder or repo id): the baked "
                    "export needs its text encoder, and an adapter saved in text-space form (the closed "
                    "form's) needs its K/V weights."
                )
            pipe = _load_text_pipeline(base, adapter)
            adapter = materialized(adapter, get_unet(pipe))
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
