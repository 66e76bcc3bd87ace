"""Train the miniature world: one seeded, resumable command.

    HF_HUB_OFFLINE=1 ace-diffusers shapes train --seed 0

Renders the scenes (blank, one object, two objects; see :mod:`ace_diffusers.shapes.render`), then
trains (1) the AutoencoderKL, (2) the slot classifier on renders and their VAE reconstructions, (3) the
UNet2DConditionModel on precomputed VAE latents and caption embeddings (computed with
``pipe.encode_prompt``, exactly what the pipeline produces at inference). Checkpoints are safetensors +
JSON only, so ``--resume`` continues an interrupted run. Final artefacts go to
``ace_diffusers/shapes/weights/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from .. import helptext
from . import vocab
from .checkpoints import load_ckpt, read_json, save_tensors, write_json
from .pipeline import (
    DEFAULT_SAMPLER,
    SCHEDULER_CONFIG,
    TOKENIZER_MAX_LENGTH,
    UNET_CONFIG,
    VAE_CONFIG,
    WEIGHTS_DIR,
    build_pipeline,
    encode_prompts,
    load_text_encoder,
    make_scheduler,
)
from .render import P_SCENE, render_dataset
from .stages import (
    StageSettings,
    encode_latents,
    log,
    train_classifier,
    train_unet,
    train_vae,
    vae_roundtrip,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv):
    p = helptext.parser("shapes train", __doc__, first_paragraph=True)
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="final weights directory (default: bundled)")
    p.add_argument(
        "--work", default=str(REPO_ROOT / "runs" / "shapes"), help="checkpoints / scratch directory"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=40000, help="number of rendered training scenes")
    p.add_argument("--captions-per-image", type=int, default=2)
    p.add_argument("--steps-cls", type=int, default=1200)
    p.add_argument("--steps-vae", type=int, default=1500)
    p.add_argument("--steps-unet", type=int, default=7000)
    p.add_argument("--batch-vae", type=int, default=32)
    p.add_argument("--batch-cls", type=int, default=128)
    p.add_argument("--batch-unet", type=int, default=96)
    p.add_argument("--lr-vae", type=float, default=1.5e-3)
    p.add_argument("--lr-cls", type=float, default=2e-3)
    p.add_argument("--lr-unet", type=float, default=6e-4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from checkpoints in --work")
    p.add_argument(
        "--finalize-from-checkpoint",
        action="store_true",
        help="stop early: write the final weights from the latest UNet checkpoint in --work (EMA weights)",
    )
    return p.parse_args(argv)


def _stage(args, name: str, work: Path) -> StageSettings:
    return StageSettings(
        steps=getattr(args, f"steps_{name}"),
        batch=getattr(args, f"batch_{name}"),
        lr=getattr(args, f"lr_{name}"),
        seed=args.seed,
        work=work,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
    )


def write_weights(d: Path, vae, scheduler, unet_sd: dict | None) -> None:
    """The pipeline's files in ``d``: VAE, scheduler and UNet configs, and the UNet's EMA weights (fp16)."""
    d.mkdir(parents=True, exist_ok=True)
    save_tensors(d / "vae.safetensors", vae.state_dict())
    write_json(d / "vae_config.json", dict(vae.config))
    write_json(
        d / "scheduler_config.json", {**dict(scheduler.config), "_class_name": type(scheduler).__name__}
    )
    write_json(d / "unet_config.json", dict(UNet2DConditionModel(**UNET_CONFIG).config))
    if unet_sd is not None:
        save_tensors(d / "unet.safetensors", {k: v.to(torch.float16) for k, v in unet_sd.items()})


def metadata(
    args, cmd: str, t_start: float, stages: dict, latents: torch.Tensor, scaling: float, n_unique
) -> dict:
    """What ``weights/train_meta.json`` records: the command, every stage's result, the vocabulary."""
    seconds = {k: v.get("train_seconds") for k, v in stages.items()}
    return {
        "command": cmd,
        "seed": args.seed,
        "args": vars(args),
        "wall_seconds_this_invocation": round(time.time() - t_start, 1),
        "train_seconds": seconds,
        "train_seconds_total": round(sum(v for v in seconds.values() if v), 1),
        "torch_threads": args.threads,
        "torch_version": torch.__version__,
        **stages,
        "latents": {
            "scaling_factor": scaling,
            "channel_mean": latents.mean(dim=(0, 2, 3)).tolist(),
            "channel_std": latents.std(dim=(0, 2, 3)).tolist(),
        },
        "default_sampler": DEFAULT_SAMPLER,
        "tokenizer_max_length": TOKENIZER_MAX_LENGTH,
        "n_unique_captions": n_unique,
        "scenes": P_SCENE,
        "vocabulary": {
            name: getattr(vocab, name)
            for name in (
                "SHAPES",
                "COLOURS",
                "STYLES",
                "SHAPE_WORDS",
                "STYLE_WORDS",
                "COLOUR_WORDS",
                "TEMPLATES",
                "PAIR_TEMPLATES",
                "NEUTRAL_PHRASES",
                "NEUTRAL_NOUNS",
            )
        },
        "scheduler_config_reference": SCHEDULER_CONFIG,
    }


def finalize_from_checkpoint(args, out: Path, work: Path, cmd: str, t_start: float) -> int:
    """Write the final artefacts from the latest UNet checkpoint (used to stop a run early)."""
    groups, ck = load_ckpt(work / "unet_ckpt")
    lt = load_file(str(work / "latents.safetensors"))
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(load_file(str(work / "vae_final.safetensors")))
    vae.register_to_config(scaling_factor=float(lt["scaling"]))
    write_weights(out, vae, make_scheduler(), groups["ema"])
    unet = {"train_seconds": round(ck["elapsed"], 1), "steps": ck["step"], "history": ck.get("history", [])}
    unet.update(planned_steps=args.steps_unet, stopped_early=ck["step"] < args.steps_unet)
    stages = {
        "classifier": read_json(out / "classifier_config.json").get("metrics", {}),
        "vae": read_json(work / "vae_final.json"),
        "unet": unet,
    }
    meta = metadata(args, cmd, t_start, stages, lt["latents"], float(lt["scaling"]), None)
    meta["command"] = cmd.replace(" --finalize-from-checkpoint", "").replace(" --resume", "")
    meta["finalize_command"] = cmd
    write_json(out / "train_meta.json", meta)
    log(f"finalized from UNet checkpoint at step {ck['step']}; weights in {out}")
    return 0


def scaled_latents(args, vae, images: np.ndarray, work: Path) -> tuple[torch.Tensor, float]:
    """The training latents times the scaling factor 1 / rms (cached in ``work``)."""
    path = work / "latents.safetensors"
    if args.resume and path.exists():
        lt = load_file(str(path))
        return lt["latents"], float(lt["scaling"])
    raw = encode_latents(vae, images)
    scaling = float(1.0 / raw.pow(2).mean().sqrt())
    save_tensors(path, {"latents": raw * scaling, "scaling": torch.tensor(scaling)})
    return raw * scaling, scaling


def caption_embeddings(vae, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fp16 embeddings of the unique captions, index (n, captions per image), number of unique)."""
    uniq = sorted({c for cs in captions for c in cs} | {""})
    pos = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([[pos[c] for c in cs] for cs in captions], dtype=torch.long)
    text_encoder, tokenizer = load_text_encoder()
    pipe = build_pipeline(UNet2DConditionModel(**UNET_CONFIG), vae, make_scheduler(), text_encoder, tokenizer)
    t0 = time.time()
    emb = encode_prompts(pipe, uniq).to(torch.float16)
    log(f"encoded {len(uniq)} unique captions in {time.time() - t0:.0f}s, emb {tuple(emb.shape)}")
    return emb, cap_idx, len(uniq)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cmd = "ace-diffusers shapes train " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"args: {vars(args)}")
    if args.finalize_from_checkpoint:
        return finalize_from_checkpoint(args, out, work, cmd, t_start)
    log(f"rendering {args.n_train} training scenes + 2000 held-out")
    data = render_dataset(args.n_train, seed=args.seed, captions=args.captions_per_image)
    held = render_dataset(2000, seed=args.seed + 10_000)
    log(f"rendered in {time.time() - t_start:.0f}s")

    vae, vae_meta = train_vae(_stage(args, "vae", work), data, held, kl_weight=args.kl_weight)
    n_recon = min(8000, args.n_train)
    recon = {"images": vae_roundtrip(vae, data["images"][:n_recon])}
    recon.update({k: v[:n_recon] for k, v in data.items() if k not in ("images", "captions")})
    held_recon = {**held, "images": vae_roundtrip(vae, held["images"])}
    cls_metrics = train_classifier(_stage(args, "cls", work), data, recon, held, held_recon, out)

    latents, scaling = scaled_latents(args, vae, data["images"], work)
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(latents.shape)} scaling_factor={scaling:.4f}")
    emb, cap_idx, n_unique = caption_embeddings(vae, data["captions"])

    snap = work / "snapshot"
    write_weights(snap, vae, make_scheduler(), None)
    save_tensors(snap / "classifier.safetensors", load_file(str(out / "classifier.safetensors")))
    write_json(snap / "classifier_config.json", read_json(out / "classifier_config.json"))

    def snapshot_fn(ema_sd, step):
        save_tensors(snap / "unet.safetensors", {k: v.to(torch.float16) for k, v in ema_sd.items()})
        write_json(snap / "snapshot.json", {"step": step})

    ema, unet_meta = train_unet(
        _stage(args, "unet", work), latents, emb, cap_idx, snapshot_fn, args.min_snr, args.ema_decay
    )
    write_weights(out, vae, make_scheduler(), ema)
    stages = {"classifier": cls_metrics, "vae": vae_meta, "unet": unet_meta}
    write_json(out / "train_meta.json", metadata(args, cmd, t_start, stages, latents, scaling, n_unique))
    log(f"done in {(time.time() - t_start) / 60:.1f} min; weights in {out}")
    return 0
