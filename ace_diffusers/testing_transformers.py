"""Tiny transformer-based models and pipelines from configs, for tests (no Hub, no downloads).

* ``t5_tokenizer``: a T5-style sentencepiece (Unigram) tokenizer built at call time from a fixed word list.
* ``tiny_pixart_pipeline``: PixArt-α with a tiny T5 encoder (cross-attention over projected T5 tokens).
* ``tiny_sana_transformer``: a Sana transformer (linear self-attention, SDPA cross-attention).
* ``tiny_sana_pipeline``: Sana with a tiny Gemma 2 encoder behind its instruction prefix (no VAE: latents).
* ``tiny_sd3_pipeline``: SD3 with two tiny CLIP encoders (and optionally a tiny T5): joint attention.
* ``tiny_flux_pipeline``: FLUX with a tiny CLIP (pooled) and T5 (tokens) encoder: double- and
  single-stream blocks.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from .testing import clip_text_config, clip_tokenizer, tiny_scheduler, tiny_vae

T5_WORDS = " ".join(
    [
        "a an the of by in on with and or to photo painting picture image drawing sketch artwork art artist",
        "style van gogh monet picasso cat dog bird horse car house tree city street night day bowl fruit",
        "table red blue green yellow black white big small old new portrait landscape sea mountain river",
        "flower garden man woman child face hat chair wooden glass sky sun moon star snow rain field road",
        "boat train",
    ]
)


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A Gemma-style tokenizer: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2 put first, ``<unk>`` = 3; the
    words of :data:`T5_WORDS` whole, anything else (Sana's long instruction too) from letter pieces."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in dict.fromkeys(T5_WORDS.split())]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in letters + list(",.!?'-:\n")]
    pieces += [("▁" + c, -9.0) for c in letters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=3))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=4096,
    )


def tiny_sana_pipeline(seed: int = 0, *, width: int = 32) -> SanaPipeline:
    """Sana from configs: a 2-layer Gemma 2 encoder of ``width`` behind the pipeline's instruction prefix,
    the 2-block :func:`tiny_sana_transformer`, no VAE (call it with ``output_type="latent"`` and
    ``use_resolution_binning=False``)."""
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=Gemma2Model(config).eval(),
        vae=None,
        transformer=tiny_sana_transformer(seed, caption_dim=width),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=4)
def t5_tokenizer(model_max_length: int = 32, *, cased: bool = False) -> PreTrainedTokenizerFast:
    """A T5-style sentencepiece (Unigram) tokenizer: ``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2;
    the words of :data:`T5_WORDS` are single pieces, any other word is spelled from letter pieces.
    ``cased``: like real T5, capitals are pieces of their own (the default lowercases everything)."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in dict.fromkeys(T5_WORDS.split())]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in letters + list(",.!?'-")]
    pieces += [("▁" + c, -9.0) for c in letters]
    if cased:
        pieces += [(c.upper(), -10.0) for c in letters[:26]] + [("▁" + c.upper(), -9.0) for c in letters[:26]]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    if not cased:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_t5(tokenizer: PreTrainedTokenizerFast, width: int) -> T5EncoderModel:
    """A 2-layer T5 encoder of ``width`` for ``tokenizer``, in eval mode (as from_pretrained leaves it)."""
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2)
    return T5EncoderModel(config).eval()


def tiny_pixart_pipeline(
    seed: int = 0, *, text_dim: int = 32, width: int = 24, cased: bool = False
) -> PixArtAlphaPipeline:
    """PixArt-α from configs: a 2-layer T5 encoder (``text_dim``), a 2-block transformer of ``width``
    whose cross-attention reads the caption projection of the T5 tokens; 2 steps at 32x32 in ~0.05 s.
    Call it with ``max_sequence_length`` at most 32 (the tokenizer's limit) or leave the default.
    ``cased``: a case-sensitive tokenizer, as real T5's (:func:`t5_tokenizer`)."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(cased=cased)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4
        )
    )
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=width // 8,
        caption_channels=text_dim,
        in_channels=4,
        cross_attention_dim=width,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    text_encoder.eval()  # as from_pretrained leaves it: T5's dropout off
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=tiny_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_transformer(seed: int = 0, *, caption_dim: int = 32, qk_norm: str | None = None):
    """A 2-block Sana transformer (linear self-attention, SDPA cross-attention over the projected and
    RMS-normed caption); ``qk_norm="rms_norm_across_heads"`` as Sana 1.5 has."""
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=caption_dim,
        sample_size=8,
        patch_size=1,
        qk_norm=qk_norm,
    )


def tiny_sd3_pipeline(seed: int = 0, *, clip_dim: int = 16, t5: bool = False) -> StableDiffusion3Pipeline:
    """SD3 from configs: two CLIP encoders of ``clip_dim`` (their projections form the pooled embedding),
    a T5 encoder when ``t5`` (else SD3's zeros stand in for its tokens), a 2-block joint-attention
    transformer whose text width is ``2 * clip_dim``; 2 steps at 32x32 in well under a second."""
    torch.manual_seed(seed)
    width = 2 * clip_dim
    encoders = [
        CLIPTextModelWithProjection(clip_text_config(clip_dim, 2, 4, 2 * clip_dim, clip_dim)) for _ in "ab"
    ]
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = t5_tokenizer()
        text_encoder_3 = tiny_t5(tokenizer_3, width)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=width,
        caption_projection_dim=16,
        pooled_projection_dim=2 * clip_dim,
        out_channels=4,
        qk_norm="rms_norm",
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts latents by the VAE's shift factor
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=clip_tokenizer(),
        text_encoder_2=encoders[1],
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, *, width: int = 64, guidance: bool = False) -> FluxPipeline:
    """FLUX from configs: a tiny CLIP encoder (its pooled output is ``pooled_projections``), a 2-layer T5
    encoder of ``width`` (the text tokens), a transformer with one double-stream and two single-stream
    blocks; ``guidance``: a guidance-distilled model (FLUX.1-dev) instead of one without (schnell).
    Call it with ``max_sequence_length`` at most 32 (the T5 tokenizer's limit)."""
    torch.manual_seed(seed)
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = tiny_t5(tokenizer_2, width)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width,
        pooled_projection_dim=16,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(clip_text_config(16, 2, 4, 32, 16)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
