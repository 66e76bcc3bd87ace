"""Train the miniature world: one seeded, resumable command.

    HF_HUB_OFFLINE=1 ace-diffusers shapes train --seed 0

Renders the data set, then trains (1) the shape/colour/style classifier, (2) the AutoencoderKL,
(3) the UNet2DConditionModel on precomputed VAE latents and precomputed caption embeddings (computed
with ``pipe.encode_prompt``, i.e. exactly what the pipeline produces at inference).  Checkpoints are
safetensors + JSON only, so ``--resume`` continues an interrupted run.  Final artefacts go to
``ace_diffusers/shapes/weights/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from tqdm import tqdm

from .._io import atomic_save_safetensors, atomic_write_text
from . import vocab
from .classifier import HEADS, ShapesClassifier, load_shapes_classifier
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
from .render import render_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def write_json(path: Path, obj) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    )


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_save_safetensors(path, tensors)


def lr_at(step: int, total: int, base: float, warmup: int = 100, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_ckpt(path: Path, models: dict[str, torch.nn.Module | dict], opt, meta: dict) -> None:
    tensors = {}
    for name, m in models.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        tensors.update({f"{name}/{k}": v for k, v in sd.items()})
    ot, groups = optimizer_tensors(opt)
    tensors.update({f"opt/{k}": v for k, v in ot.items()})
    save_tensors(path.with_suffix(".safetensors"), tensors)
    write_json(path.with_suffix(".json"), {**meta, "param_groups": groups})


def load_ckpt(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, rest = k.split("/", 1)
        groups.setdefault(name, {})[rest] = v
    return groups, read_json(path.with_suffix(".json"))


def to_float(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(255.0)


def random_blur(x: torch.Tensor, g: torch.Generator, max_sigma: float = 0.9) -> torch.Tensor:
    """Per-sample gaussian blur (3x3 kernel, sigma ~ U(0, max_sigma), applied to half the batch)."""
    n = x.shape[0]
    sig = torch.rand(n, generator=g) * max_sigma
    sig = torch.where(torch.rand(n, generator=g) < 0.5, torch.zeros_like(sig), sig).clamp_min(1e-3)
    r = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(r[None] ** 2) / (2 * sig[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # (n,3,3)
    k = k2[:, None].repeat_interleave(3, 0)  # (3n,1,3,3)
    y = F.conv2d(F.pad(x.reshape(1, 3 * n, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), k, groups=3 * n)
    return y.reshape_as(x)


# ------------------------------------------------------------------------------------ classifier
def train_classifier(args, data, held, out: Path) -> dict:
    if (
        args.resume
        and (out / "classifier.safetensors").exists()
        and (out / "classifier_config.json").exists()
    ):
        log("classifier: found, skipping")
        return read_json(out / "classifier_config.json").get("metrics", {})
    t0 = time.time()
    torch.manual_seed(args.seed)
    model = ShapesClassifier(width=32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    X = to_float(data["images"])
    Y = {k: torch.from_numpy(data[k]) for k in HEADS}
    g = torch.Generator().manual_seed(args.seed + 11)
    bar = tqdm(range(args.steps_cls), desc="classifier", mininterval=5)
    ema_loss = None
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps_cls, 2e-3, warmup=30, final_frac=0.02)
        idx = torch.randint(len(X), (128,), generator=g)
        x = X[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        x = random_blur(x, g)
        x = x + torch.randn(x.shape, generator=g) * (torch.rand(len(x), 1, 1, 1, generator=g) * 0.05)
        x = x.clamp(0, 1)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], Y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
    model.eval()
    pred = model.predict_indices(to_float(held["images"]))
    metrics = {f"heldout_acc_{k}": float((pred[k].numpy() == held[k]).mean()) for k in HEADS}
    metrics["train_seconds"] = round(time.time() - t0, 1)
    log(f"classifier: {metrics}")
    save_tensors(out / "classifier.safetensors", model.state_dict())
    write_json(
        out / "classifier_config.json",
        {"width": 32, "heads": HEADS, "metrics": metrics, "steps": args.steps_cls},
    )
    return metrics


# ------------------------------------------------------------------------------------------- VAE
def train_vae(args, data, held, work: Path, out: Path):

    vae = AutoencoderKL(**VAE_CONFIG)
    final = work / "vae_final.safetensors"
    if args.resume and final.exists():
        log("vae: found final, skipping training")
        vae.load_state_dict(load_file(str(final)))
        return vae.eval().requires_grad_(False), read_json(work / "vae_final.json")
    t0 = time.time()
    torch.manual_seed(args.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)
    start, elapsed0 = 0, 0.0
    ck = work / "vae_ckpt"
    if args.resume and ck.with_suffix(".json").exists():
        groups, meta = load_ckpt(ck)
        vae.load_state_dict(groups["model"])
        load_optimizer(opt, groups["opt"], meta["param_groups"])
        start, elapsed0 = meta["step"], meta["elapsed"]
        log(f"vae: resumed at step {start}")
    X = to_float(data["images"]) * 2 - 1
    bar = tqdm(range(start, args.steps_vae), desc="vae", initial=start, total=args.steps_vae, mininterval=5)
    ema_loss = None
    vae.train()
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7 * step + 1)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps_vae, args.lr_vae, warmup=50)
        x = X[torch.randint(len(X), (args.batch_vae,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (x[0].numel())
        loss = mse + 0.5 * F.l1_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema_loss = mse.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * mse.item()
        bar.set_postfix(mse=f"{ema_loss:.5f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps_vae:
            save_ckpt(ck, {"model": vae}, opt, {"step": step + 1, "elapsed": elapsed0 + time.time() - t0})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        Xh = to_float(held["images"][:1000]) * 2 - 1
        rec = vae.decode(vae.encode(Xh).latent_dist.mean).sample
        mse = float(F.mse_loss(rec, Xh))
    meta = {
        "heldout_mse": mse,
        "train_seconds": round(elapsed0 + time.time() - t0, 1),
        "steps": args.steps_vae,
    }
    log(f"vae: {meta}")
    save_tensors(final, vae.state_dict())
    write_json(work / "vae_final.json", meta)
    return vae, meta


@torch.no_grad()
def encode_latents(vae, images_u8: np.ndarray, bs: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(images_u8), bs):
        x = to_float(images_u8[i : i + bs]) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def vae_roundtrip(vae, images_u8: np.ndarray, bs: int = 500) -> torch.Tensor:
    """Images in [0,1] after encode (posterior mean) + decode: what the pipeline can produce at best."""
    out = []
    for i in range(0, len(images_u8), bs):
        x = to_float(images_u8[i : i + bs]) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def finetune_classifier_on_reconstructions(
    args, vae, held, out: Path, n: int = 6000, steps: int = 250
) -> dict:
    """Fine-tune the classifier on a 50/50 mix of renders and their VAE reconstructions.

    Generated images live in the VAE's output space, where fine stripes/dots are softened; this keeps
    the classifier accurate on them (it is still checked on crisp renders).
    """
    cfg = read_json(out / "classifier_config.json")
    if cfg.get("recon_finetune"):
        log("classifier: already fine-tuned on VAE reconstructions, skipping")
        return cfg["metrics"]
    t0 = time.time()
    model = ShapesClassifier(width=cfg.get("width", 32))
    model.load_state_dict(load_file(str(out / "classifier.safetensors")))
    data = render_dataset(n, seed=args.seed + 20_000)
    X = to_float(data["images"])
    R = vae_roundtrip(vae, data["images"])
    Y = {k: torch.from_numpy(data[k]) for k in HEADS}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 21)
    model.train()
    bar = tqdm(range(steps), desc="classifier (reconstructions)", mininterval=5)
    ema_loss = None
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, 5e-4, warmup=20, final_frac=0.02)
        i1 = torch.randint(n, (64,), generator=g)
        i2 = torch.randint(n, (64,), generator=g)
        x = torch.cat([X[i1], R[i2]])
        idx = torch.cat([i1, i2])
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        x = random_blur(x, g, max_sigma=0.6)
        x = (x + torch.randn(x.shape, generator=g) * (torch.rand(len(x), 1, 1, 1, generator=g) * 0.04)).clamp(
            0, 1
        )
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], Y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
    model.eval()
    metrics = dict(cfg["metrics"])
    pred = model.predict_indices(to_float(held["images"]))
    metrics.update({f"heldout_acc_{k}": float((pred[k].numpy() == held[k]).mean()) for k in HEADS})
    rec = vae_roundtrip(vae, held["images"])
    pred = model.predict_indices(rec)
    metrics.update(
        {f"heldout_reconstruction_acc_{k}": float((pred[k].numpy() == held[k]).mean()) for k in HEADS}
    )
    metrics["recon_finetune_seconds"] = round(time.time() - t0, 1)
    log(f"classifier after fine-tuning on reconstructions: {metrics}")
    save_tensors(out / "classifier.safetensors", model.state_dict())
    cfg.update({"metrics": metrics, "recon_finetune": {"n": n, "steps": steps, "batch": 128}})
    write_json(out / "classifier_config.json", cfg)
    return metrics


# ------------------------------------------------------------------------------------------ UNet
def train_unet(
    args, latents: torch.Tensor, emb: torch.Tensor, cap_idx: torch.Tensor, work: Path, snapshot_fn
):

    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr_unet, weight_decay=1e-2)
    sched = make_scheduler()
    abar = sched.alphas_cumprod.float()
    start, elapsed0, history = 0, 0.0, []
    ck = work / "unet_ckpt"
    if args.resume and ck.with_suffix(".json").exists():
        groups, meta = load_ckpt(ck)
        unet.load_state_dict(groups["model"])
        ema = groups["ema"]
        load_optimizer(opt, groups["opt"], meta["param_groups"])
        start, elapsed0, history = meta["step"], meta["elapsed"], meta.get("history", [])
        log(f"unet: resumed at step {start}")
    t0 = time.time()
    unet.train()
    params = dict(unet.named_parameters())
    bar = tqdm(
        range(start, args.steps_unet), desc="unet", initial=start, total=args.steps_unet, mininterval=5
    )
    ema_loss = None
    N, ncap = cap_idx.shape
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 13 * step + 2)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps_unet, args.lr_unet, warmup=100)
        idx = torch.randint(N, (args.batch_unet,), generator=g)
        which = torch.randint(ncap, (args.batch_unet,), generator=g)
        cond = emb[cap_idx[idx, which]].float()
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_unet,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, cond).sample
        snr = abar[t] / (1 - abar[t])
        w = torch.clamp(snr, max=args.min_snr) / snr
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in params.items():
                ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if (step + 1) % 50 == 0:
            history.append([step + 1, round(ema_loss, 5), round(elapsed0 + time.time() - t0, 1)])
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps_unet:
            elapsed = elapsed0 + time.time() - t0
            save_ckpt(
                ck,
                {"model": unet, "ema": ema},
                opt,
                {"step": step + 1, "elapsed": elapsed, "history": history},
            )
            snapshot_fn(ema, step + 1)
            log(f"unet: checkpoint at step {step + 1}, loss {ema_loss:.4f}, {elapsed / 60:.1f} min")
    # buffers (none expected) are copied from the live model
    for k, v in unet.state_dict().items():
        if k not in params:
            ema[k] = v.detach().clone()
    return ema, {
        "train_seconds": round(elapsed0 + time.time() - t0, 1),
        "steps": args.steps_unet,
        "history": history,
    }


# ------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="ace-diffusers shapes train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out", default=str(WEIGHTS_DIR), help="final weights directory (default: bundled weights dir)"
    )
    p.add_argument(
        "--work", default=str(REPO_ROOT / "runs" / "shapes"), help="checkpoints / scratch directory"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=30000, help="number of rendered training images")
    p.add_argument("--captions-per-image", type=int, default=2)
    p.add_argument("--steps-cls", type=int, default=700)
    p.add_argument("--steps-vae", type=int, default=1200)
    p.add_argument("--steps-unet", type=int, default=3000)
    p.add_argument("--batch-vae", type=int, default=64)
    p.add_argument("--batch-unet", type=int, default=96)
    p.add_argument("--lr-vae", type=float, default=1e-3)
    p.add_argument("--lr-unet", type=float, default=8e-4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from checkpoints in --work")
    p.add_argument(
        "--finalize-from-checkpoint",
        action="store_true",
        help="stop early: write the final weights from the latest UNet checkpoint in --work (EMA weights), "
        "no training",
    )
    return p.parse_args(argv)


def finalize_from_checkpoint(args, out: Path, work: Path, cmd: str, t_start: float) -> int:
    """Write the final artefacts from the latest UNet checkpoint (used to stop a run early)."""

    groups, ck = load_ckpt(work / "unet_ckpt")
    lt = load_file(str(work / "latents.safetensors"))
    scaling = float(lt["scaling"])
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(load_file(str(work / "vae_final.safetensors")))
    vae.register_to_config(scaling_factor=scaling)
    scheduler = make_scheduler()
    unet_cfg = dict(UNet2DConditionModel(**UNET_CONFIG).config)
    _write_weights(out, vae, scheduler, unet_cfg, groups["ema"])
    cls_metrics = read_json(out / "classifier_config.json").get("metrics", {})
    vae_meta = read_json(work / "vae_final.json")
    unet_meta = {
        "train_seconds": round(ck["elapsed"], 1),
        "steps": ck["step"],
        "history": ck.get("history", []),
        "planned_steps": args.steps_unet,
        "stopped_early": ck["step"] < args.steps_unet,
    }
    lat = lt["latents"]
    latents_meta = {
        "scaling_factor": scaling,
        "channel_mean": lat.mean(dim=(0, 2, 3)).tolist(),
        "channel_std": lat.std(dim=(0, 2, 3)).tolist(),
    }
    meta = _metadata(args, cmd, t_start, cls_metrics, vae_meta, unet_meta, latents_meta, None)
    meta["command"] = cmd.replace(" --finalize-from-checkpoint", "").replace(" --resume", "")
    meta["finalize_command"] = cmd
    write_json(out / "train_meta.json", meta)
    log(f"finalized from UNet checkpoint at step {ck['step']}; weights in {out}")
    return 0


def _write_weights(d: Path, vae, scheduler, unet_cfg: dict, unet_sd: dict | None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_tensors(d / "vae.safetensors", vae.state_dict())
    write_json(d / "vae_config.json", dict(vae.config))
    sc = dict(scheduler.config)
    sc["_class_name"] = type(scheduler).__name__
    write_json(d / "scheduler_config.json", sc)
    write_json(d / "unet_config.json", unet_cfg)
    if unet_sd is not None:
        save_tensors(d / "unet.safetensors", {k: v.to(torch.float16) for k, v in unet_sd.items()})


def _metadata(args, cmd, t_start, cls_metrics, vae_meta, unet_meta, latents_meta, n_unique) -> dict:
    ts = {
        "classifier": cls_metrics.get("train_seconds"),
        "classifier_recon_finetune": cls_metrics.get("recon_finetune_seconds"),
        "vae": vae_meta.get("train_seconds"),
        "unet": unet_meta.get("train_seconds"),
    }
    return {
        "command": cmd,
        "seed": args.seed,
        "args": vars(args),
        "wall_seconds_this_invocation": round(time.time() - t_start, 1),
        "train_seconds": ts,
        "train_seconds_total": round(sum(v for v in ts.values() if v), 1),
        "torch_threads": args.threads,
        "torch_version": torch.__version__,
        "classifier": cls_metrics,
        "vae": vae_meta,
        "unet": unet_meta,
        "latents": latents_meta,
        "default_sampler": DEFAULT_SAMPLER,
        "tokenizer_max_length": TOKENIZER_MAX_LENGTH,
        "n_unique_captions": n_unique,
        "vocabulary": {
            "shapes": vocab.SHAPES,
            "colours": vocab.COLOURS,
            "styles": vocab.STYLES,
            "shape_words": vocab.SHAPE_WORDS,
            "style_words": vocab.STYLE_WORDS,
            "colour_words": vocab.COLOUR_WORDS,
            "templates": vocab.TEMPLATES,
            "p_empty": vocab.P_EMPTY,
            "p_colour": vocab.P_COLOUR,
            "p_style": vocab.P_STYLE,
        },
        "scheduler_config_reference": SCHEDULER_CONFIG,
    }


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

    log(f"rendering {args.n_train} training images + 2000 held-out")
    data = render_dataset(args.n_train, seed=args.seed, captions=args.captions_per_image)
    held = render_dataset(2000, seed=args.seed + 10_000)
    log(f"rendered in {time.time() - t_start:.0f}s")

    cls_metrics = train_classifier(args, data, held, out)
    vae, vae_meta = train_vae(args, data, held, work, out)

    # latents and scaling factor
    lat_path = work / "latents.safetensors"
    if args.resume and lat_path.exists():
        lt = load_file(str(lat_path))
        latents, scaling = lt["latents"], float(lt["scaling"])
    else:
        raw = encode_latents(vae, data["images"])
        scaling = float(1.0 / raw.pow(2).mean().sqrt())
        latents = raw * scaling
        save_tensors(lat_path, {"latents": latents, "scaling": torch.tensor(scaling)})
    vae.register_to_config(scaling_factor=scaling)
    chan_mean = latents.mean(dim=(0, 2, 3)).tolist()
    chan_std = latents.std(dim=(0, 2, 3)).tolist()
    log(
        f"latents {tuple(latents.shape)} scaling_factor={scaling:.4f} chan mean={np.round(chan_mean, 3)} "
        f"std={np.round(chan_std, 3)}"
    )

    cls_metrics = finetune_classifier_on_reconstructions(args, vae, held, out)

    # classifier accuracy on VAE reconstructions (diagnostic of colour fidelity)

    clf = load_shapes_classifier(weights_dir=out)
    with torch.no_grad():
        hz = encode_latents(vae, held["images"][:1000])
        rec = ((vae.decode(hz).sample + 1) / 2).clamp(0, 1)
    pr = clf.predict_indices(rec)
    vae_meta["classifier_acc_on_reconstructions"] = {
        k: float((pr[k].numpy() == held[k][:1000]).mean()) for k in HEADS
    }
    log(f"classifier on VAE reconstructions: {vae_meta['classifier_acc_on_reconstructions']}")

    # caption embeddings, exactly as the pipeline computes them
    text_encoder, tokenizer = load_text_encoder()
    scheduler = make_scheduler()
    caps = data["captions"]
    uniq = sorted({c for cs in caps for c in cs} | {""})
    pos = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([[pos[c] for c in cs] for cs in caps], dtype=torch.long)

    tmp_pipe = build_pipeline(UNet2DConditionModel(**UNET_CONFIG), vae, scheduler, text_encoder, tokenizer)
    te0 = time.time()
    emb = encode_prompts(tmp_pipe, uniq).to(torch.float32)
    log(f"encoded {len(uniq)} unique captions in {time.time() - te0:.0f}s, emb {tuple(emb.shape)}")
    del tmp_pipe

    def write_common(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "vae.safetensors", vae.state_dict())
        write_json(d / "vae_config.json", dict(vae.config))
        sc = dict(scheduler.config)
        sc["_class_name"] = type(scheduler).__name__
        write_json(d / "scheduler_config.json", sc)
        ucfg = (
            dict(UNet2DConditionModel(**UNET_CONFIG).config)
            if not (d / "unet_config.json").exists()
            else None
        )
        if ucfg is not None:
            write_json(d / "unet_config.json", ucfg)

    snap = work / "snapshot"
    write_common(snap)
    if out != snap:
        for f in ("classifier.safetensors", "classifier_config.json"):
            shutil.copy(out / f, snap / f)

    def snapshot_fn(ema_sd, step):
        save_tensors(snap / "unet.safetensors", {k: v.to(torch.float16) for k, v in ema_sd.items()})
        write_json(snap / "snapshot.json", {"step": step})

    ema, unet_meta = train_unet(args, latents, emb, cap_idx, work, snapshot_fn)

    # final artefacts
    _write_weights(out, vae, scheduler, dict(UNet2DConditionModel(**UNET_CONFIG).config), ema)
    total = time.time() - t_start
    latents_meta = {"scaling_factor": scaling, "channel_mean": chan_mean, "channel_std": chan_std}
    write_json(
        out / "train_meta.json",
        _metadata(args, cmd, t_start, cls_metrics, vae_meta, unet_meta, latents_meta, len(uniq)),
    )
    log(f"done in {total / 60:.1f} min; weights in {out}")
    return 0
