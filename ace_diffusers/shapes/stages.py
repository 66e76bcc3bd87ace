"""The three training stages of the miniature world: VAE, slot classifier, UNet.

Each stage is seeded, checkpoints itself through :mod:`ace_diffusers.shapes.checkpoints` and, with
``resume=True``, continues where an interrupted run stopped. The UNet learns **v-prediction** on a
**zero-terminal-SNR** schedule (``rescale_betas_zero_snr``): at the last timestep the latent holds no
trace of the image, so the text alone decides what is drawn, and the empty prompt (captioning only blank
scenes) draws nothing, as it should for classifier-free guidance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoints import (
    has_ckpt,
    load_ckpt,
    load_optimizer,
    lr_at,
    read_json,
    save_ckpt,
    save_tensors,
    write_json,
)
from .classifier import HEADS, ShapesClassifier
from .pipeline import UNET_CONFIG, VAE_CONFIG, make_scheduler
from .render import slot_crops


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")


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
    k = (k1[:, :, None] * k1[:, None, :])[:, None].repeat_interleave(3, 0)  # (3n,1,3,3)
    y = F.conv2d(F.pad(x.reshape(1, 3 * n, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), k, groups=3 * n)
    return y.reshape_as(x)


@dataclass
class StageSettings:
    """Steps, batch and learning rate of one stage, and where and how often it checkpoints."""

    steps: int
    batch: int
    lr: float
    seed: int
    work: Path
    ckpt_every: int = 200
    resume: bool = False


# ------------------------------------------------------------------------------------------- VAE
def train_vae(s: StageSettings, data: dict, held: dict, kl_weight: float = 1e-4):
    """AutoencoderKL on whole scenes: MSE + 0.5 L1 + a small KL term. Returns (vae, meta)."""
    final = s.work / "vae_final.safetensors"
    vae = AutoencoderKL(**VAE_CONFIG)
    if s.resume and final.exists():
        log("vae: found final, skipping training")
        vae.load_state_dict(load_file(str(final)))
        return vae.eval().requires_grad_(False), read_json(s.work / "vae_final.json")
    torch.manual_seed(s.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    start, elapsed0, t0, ck = 0, 0.0, time.time(), s.work / "vae_ckpt"
    if s.resume and has_ckpt(ck):
        groups, meta = load_ckpt(ck)
        vae.load_state_dict(groups["model"])
        load_optimizer(opt, groups["opt"], meta["param_groups"])
        start, elapsed0 = meta["step"], meta["elapsed"]
        log(f"vae: resumed at step {start}")
    X = to_float(data["images"]) * 2 - 1
    bar = tqdm(range(start, s.steps), desc="vae", initial=start, total=s.steps, mininterval=5)
    vae.train()
    for step in bar:
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + 7 * step + 1)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, s.steps, s.lr, warmup=50)
        x = X[torch.randint(len(X), (s.batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g)).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 0.5 * F.l1_loss(rec, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.5f}")
        if (step + 1) % s.ckpt_every == 0 and step + 1 < s.steps:
            save_ckpt(ck, {"model": vae}, opt, {"step": step + 1, "elapsed": elapsed0 + time.time() - t0})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        Xh = to_float(held["images"][:1000]) * 2 - 1
        mse = float(F.mse_loss(vae.decode(vae.encode(Xh).latent_dist.mean).sample, Xh))
    meta = {"heldout_mse": mse, "train_seconds": round(elapsed0 + time.time() - t0, 1), "steps": s.steps}
    log(f"vae: {meta}")
    save_tensors(final, vae.state_dict())
    write_json(s.work / "vae_final.json", meta)
    return vae, meta


@torch.no_grad()
def encode_latents(vae, images_u8: np.ndarray, bs: int = 500) -> torch.Tensor:
    """Posterior means (unscaled) of uint8 scenes."""
    return torch.cat(
        [
            vae.encode(to_float(images_u8[i : i + bs]) * 2 - 1).latent_dist.mean
            for i in range(0, len(images_u8), bs)
        ]
    )


@torch.no_grad()
def vae_roundtrip(vae, images_u8: np.ndarray, bs: int = 500) -> np.ndarray:
    """uint8 scenes after encode (posterior mean) + decode: what the pipeline can produce at best."""
    out = []
    for i in range(0, len(images_u8), bs):
        z = vae.encode(to_float(images_u8[i : i + bs]) * 2 - 1).latent_dist.mean
        rec = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
        out.append((rec * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------ classifier
def _slot_targets(crops: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(crops[k]) for k in HEADS}


def _classifier_loss(model, x: torch.Tensor, y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the shape head on every slot; colour / style only where a shape is drawn."""
    logits = model(x)
    loss = F.cross_entropy(logits["shape"], y["shape"])
    drawn = y["colour"] >= 0
    if drawn.any():
        loss = loss + sum(F.cross_entropy(logits[k][drawn], y[k][drawn]) for k in ("colour", "style"))
    return loss


def slot_accuracy(model, scenes: dict) -> dict[str, float]:
    """Held-out accuracy per head over slots (colour / style over non-empty slots only)."""
    crops = slot_crops(scenes)
    pred = model.predict_indices(to_float(crops["images"]))
    drawn = crops["colour"] >= 0
    out = {"shape": float((pred["shape"].numpy() == crops["shape"]).mean())}
    for k in ("colour", "style"):  # NaN when no slot shows a shape
        out[k] = float((pred[k].numpy()[drawn] == crops[k][drawn]).mean()) if drawn.any() else float("nan")
    return out


def train_classifier(
    s: StageSettings, data: dict, recon: dict, held: dict, held_recon: dict, out: Path
) -> dict:
    """The slot classifier on a 50/50 mix of rendered slots and their VAE reconstructions."""
    cfg_path = out / "classifier_config.json"
    if s.resume and (out / "classifier.safetensors").exists() and cfg_path.exists():
        log("classifier: found, skipping")
        return read_json(cfg_path).get("metrics", {})
    t0 = time.time()
    torch.manual_seed(s.seed)
    model = ShapesClassifier(width=32)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    crops, rcrops = slot_crops(data), slot_crops(recon)
    X, R = to_float(crops["images"]), to_float(rcrops["images"])
    Y, YR = _slot_targets(crops), _slot_targets(rcrops)
    g = torch.Generator().manual_seed(s.seed + 11)
    bar = tqdm(range(s.steps), desc="classifier", mininterval=5)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, s.steps, s.lr, warmup=30, final_frac=0.02)
        i1, i2 = (
            torch.randint(len(X), (s.batch // 2,), generator=g),
            torch.randint(len(R), (s.batch // 2,), generator=g),
        )
        x = torch.cat([X[i1], R[i2]])
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        x = random_blur(x, g, max_sigma=0.7)
        x = (x + torch.randn(x.shape, generator=g) * (torch.rand(len(x), 1, 1, 1, generator=g) * 0.05)).clamp(
            0, 1
        )
        loss = _classifier_loss(model, x, {k: torch.cat([Y[k][i1], YR[k][i2]]) for k in Y})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    metrics = {f"heldout_acc_{k}": v for k, v in slot_accuracy(model, held).items()}
    metrics.update(
        {f"heldout_reconstruction_acc_{k}": v for k, v in slot_accuracy(model, held_recon).items()}
    )
    metrics["train_seconds"] = round(time.time() - t0, 1)
    log(f"classifier: {metrics}")
    save_tensors(out / "classifier.safetensors", model.state_dict())
    write_json(
        cfg_path, {"width": 32, "heads": HEADS, "metrics": metrics, "steps": s.steps, "batch": s.batch}
    )
    return metrics


# ------------------------------------------------------------------------------------------ UNet
def v_target_and_weight(z0, noise, t, abar, min_snr: float):
    """The noised latent, the v-prediction target and the loss weight of each sample.

    ``z_t = sqrt(a) z0 + sqrt(1-a) eps`` and ``v = sqrt(a) eps - sqrt(1-a) z0`` with ``a = abar[t]``.
    Measured on ``z0`` the v-loss weighs ``snr + 1``; the weight ``(min(snr, min_snr) + 1) / (snr + 1)``
    turns that into min-SNR's ``min(snr, min_snr)`` plus one, so the pure-noise end (snr = 0), where
    the text alone sets the layout, keeps a full weight.
    """
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * z0
    snr = abar[t] / (1 - abar[t])
    return zt, v, (torch.clamp(snr, max=min_snr) + 1) / (snr + 1)


def _unet_state(s: StageSettings, unet, opt):
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start, elapsed0, history = 0, 0.0, []
    ck = s.work / "unet_ckpt"
    if s.resume and has_ckpt(ck):
        groups, meta = load_ckpt(ck)
        unet.load_state_dict(groups["model"])
        ema = groups["ema"]
        load_optimizer(opt, groups["opt"], meta["param_groups"])
        start, elapsed0, history = meta["step"], meta["elapsed"], meta.get("history", [])
        log(f"unet: resumed at step {start}")
    return ema, start, elapsed0, history


def train_unet(
    s: StageSettings,
    latents: torch.Tensor,
    emb: torch.Tensor,
    cap_idx: torch.Tensor,
    snapshot_fn: Callable[[dict, int], None],
    min_snr: float = 5.0,
    ema_decay: float = 0.999,
):
    """UNet2DConditionModel on precomputed latents and caption embeddings; returns (EMA weights, meta)."""
    torch.manual_seed(s.seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=1e-2)
    abar = make_scheduler().alphas_cumprod.float()
    ema, start, elapsed0, history = _unet_state(s, unet, opt)
    t0, params, ema_loss = time.time(), dict(unet.named_parameters()), None
    unet.train()
    bar = tqdm(range(start, s.steps), desc="unet", initial=start, total=s.steps, mininterval=5)
    for step in bar:
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + 13 * step + 2)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, s.steps, s.lr, warmup=200)
        idx = torch.randint(len(latents), (s.batch,), generator=g)
        cond = emb[cap_idx[idx, torch.randint(cap_idx.shape[1], (s.batch,), generator=g)]].float()
        t = torch.randint(0, len(abar), (s.batch,), generator=g)
        zt, v, w = v_target_and_weight(
            latents[idx], torch.randn(latents[idx].shape, generator=g), t, abar, min_snr
        )
        loss = (w * (unet(zt, t, cond).sample - v).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in params.items():
                ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if (step + 1) % 50 == 0:
            history.append([step + 1, round(ema_loss, 5), round(elapsed0 + time.time() - t0, 1)])
        if (step + 1) % s.ckpt_every == 0 and step + 1 < s.steps:
            meta = {"step": step + 1, "elapsed": elapsed0 + time.time() - t0, "history": history}
            save_ckpt(s.work / "unet_ckpt", {"model": unet, "ema": ema}, opt, meta)
            snapshot_fn(ema, step + 1)
            log(f"unet: checkpoint at step {step + 1}, loss {ema_loss:.4f}, {meta['elapsed'] / 60:.1f} min")
    ema.update({k: v.detach().clone() for k, v in unet.state_dict().items() if k not in params})
    return ema, {"train_seconds": round(elapsed0 + time.time() - t0, 1), "steps": s.steps, "history": history}
