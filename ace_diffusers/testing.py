"""Pipelines built from configs, for tests and benchmarks (no Hub, no downloads).

* ``tiny_sd_pipeline`` / ``tiny_sdxl_pipeline``: real diffusers pipelines with tiny random components
  (2 denoising steps at 32x32 take ~0.1 s), for exercising every code path.
* ``sd15_shaped_pipeline`` / ``sdxl_shaped_unet``: random weights at the real sizes, for speed/memory
  benchmarks. Their *outputs* mean nothing; their *costs* are the real ones.
* transformer-based pipelines (PixArt, Sana, SD3) and a T5 tokenizer:
  :mod:`ace_diffusers.testing_transformers`.
* ``clip_tokenizer``: the real CLIP BPE tokenizer, built from the vocabulary that ships inside the
  ``open-clip-torch`` wheel (``pip install --no-deps open-clip-torch``): token ids match SD's tokenizer.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .core.adapter import ACEAdapter
from .core.factors import LayerFactors, PooledFactors
from .integration.modules import layer_shapes

CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


def _clip_bpe_path() -> Path:
    """CLIP's BPE vocabulary, bundled with its licence (``data/clip_bpe_simple_vocab_16e6.LICENSE.txt``)."""
    return Path(__file__).resolve().parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (vocab 49408: bytes, bytes+``</w>``, merges, then the two specials)."""
    lines = gzip.open(_clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=model_max_length
    )


def clip_text_config(
    hidden: int, layers: int, heads: int, intermediate: int, projection_dim: int
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_pipeline(
    seed: int = 0, *, text_dim: int = 64, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """SD-1-like (default) or SD-2-like (e.g. ``text_dim=96, prediction_type="v_prediction"``)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(clip_text_config(text_dim, 2, 4, 2 * text_dim, text_dim))
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, *, text_dim: int = 64) -> StableDiffusionXLPipeline:
    """SDXL-like: two CLIP text encoders (``text_dim / 2`` each, concatenated), ``text_time`` conditioning."""
    half = text_dim // 2
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + half,
        cross_attention_dim=text_dim,
        norm_num_groups=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_text_config(half, 2, 4, 2 * half, half)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(half, 2, 4, 2 * half, half)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_shaped_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Random weights at Stable Diffusion 1.5's real sizes: CLIP ViT-L/14 text encoder (123 M), 860 M UNet
    with 16 cross-attention layers of text width 768."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(clip_text_config(768, 12, 12, 3072, 768))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_shaped_unet(
    seed: int = 0, *, transformer_layers: int | tuple[int, ...] = (1, 2, 10)
) -> UNet2DConditionModel:
    """Random-weight UNet at SDXL's real sizes (70 cross-attention layers, text width 2048); fewer
    ``transformer_layers`` per block keep its widths at a fraction of the depth (for timing on a CPU)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048,
    )


def random_adapter(
    unet: UNet2DConditionModel,
    *,
    rank: int = 4,
    seed: int = 0,
    gate_bias: float = 0.0,
    concepts: tuple[str, ...] = ("random concept",),
    magnitude: float = 0.5,
    pooled_dim: int | None = None,
) -> ACEAdapter:
    """A random adapter matching ``unet``'s cross-attention layers (for mechanics tests only);
    ``pooled_dim``: also a random edit of a pooled embedding of that width (SDXL-style UNets)."""

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    layers = {}
    for name, (d_text, d_k, d_v) in layer_shapes(unet).items():
        layers[name] = LayerFactors(
            k_down=randn(rank, d_text) / d_text**0.5,
            k_up=randn(d_k, rank) * magnitude,
            v_down=randn(rank, d_text) / d_text**0.5,
            v_up=randn(d_v, rank) * magnitude,
            gate_weight=randn(d_text) / d_text**0.5,
            gate_bias=torch.tensor([gate_bias]),
        )
    pooled = None
    if pooled_dim is not None:
        pooled = PooledFactors(
            p_down=randn(rank, pooled_dim) / pooled_dim**0.5,
            p_up=randn(pooled_dim, rank) * magnitude,
            gate_weight=randn(pooled_dim) / pooled_dim**0.5,
            gate_bias=torch.tensor([gate_bias]),
        )
    return ACEAdapter(
        layers, concepts=list(concepts), neutral=[""] * len(concepts), method="random", pooled=pooled
    )
