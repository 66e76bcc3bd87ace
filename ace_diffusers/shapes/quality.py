"""Measure how well the miniature-world pipeline draws what it is asked for.

    HF_HUB_OFFLINE=1 ace-diffusers shapes quality

Generates ``--n-per-prompt`` images (fixed seeds) per prompt with ``DEFAULT_SAMPLER`` and classifies
them with the bundled classifier:

* canonical prompts ``a {colour} {shape}`` (all 64)      -> shape and colour accuracy
* trained shape synonyms ``a {colour} {synonym}``         -> shape accuracy
* style prompts ``a {style} {colour} {shape}``            -> style accuracy (canonical and synonym style
words)

Prints a table and (unless ``--no-docs``) writes it into ``docs/miniature_world.md`` between
``<!-- quality:start -->`` and ``<!-- quality:end -->``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import torch

from .classifier import load_shapes_classifier
from .pipeline import DEFAULT_SAMPLER, WEIGHTS_DIR, generate, load_shapes_pipeline
from .render import save_grid
from .vocab import COLOURS, SHAPE_WORDS, SHAPES, STYLE_WORDS, STYLES, article_fix

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "miniature_world.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def prompt_sets() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Named lists of (prompt, expected labels)."""
    canonical = [(article_fix(f"a {c} {s}"), {"shape": s, "colour": c}) for s in SHAPES for c in COLOURS]
    synonyms, style, style_syn = [], [], []
    j = 0
    for s in SHAPES:
        for w in SHAPE_WORDS[s][1:]:
            c = COLOURS[j % len(COLOURS)]
            j += 1
            synonyms.append((article_fix(f"a {c} {w}"), {"shape": s, "colour": c}))
    j = 0
    for st in STYLES:
        for s in SHAPES:
            c = COLOURS[j % len(COLOURS)]
            j += 1
            style.append((article_fix(f"a {st} {c} {s}"), {"shape": s, "colour": c, "style": st}))
            for w in STYLE_WORDS[st][1:]:
                c2 = COLOURS[(j + 3) % len(COLOURS)]
                style_syn.append((article_fix(f"a {w} {c2} {s}"), {"shape": s, "colour": c2, "style": st}))
    return {"canonical": canonical, "shape synonyms": synonyms, "style": style, "style synonyms": style_syn}


ROWS = [
    # (set, label, target)
    ("canonical", "shape", 0.90),
    ("canonical", "colour", 0.90),
    ("shape synonyms", "shape", 0.80),
    ("style", "style", 0.80),
    ("style synonyms", "style", None),
    ("style", "shape", None),
    ("style", "colour", None),
]


def evaluate(
    pipe, classifier, n_per_prompt: int = 8, seed: int = 0, batch_size: int = 64, sets=None, **sampler
):
    """Returns {set_name: {"n": images, "acc": {label: accuracy}, "per_prompt": [...]}}."""

    results = {}
    for name, items in (sets or prompt_sets()).items():
        prompts = [p for p, _ in items for _ in range(n_per_prompt)]
        seeds = [seed + k for _ in items for k in range(n_per_prompt)]
        imgs = generate(pipe, prompts, seeds=seeds, batch_size=batch_size, **sampler)
        pred = classifier.predict(imgs)
        labels = sorted({k for _, exp in items for k in exp})
        correct = {k: 0 for k in labels}
        per_prompt = []
        for i, (p, exp) in enumerate(items):
            sl = slice(i * n_per_prompt, (i + 1) * n_per_prompt)
            row = {"prompt": p, "expected": exp}
            for k in labels:
                c = sum(v == exp[k] for v in pred[k][sl])
                correct[k] += c
                row[k] = c / n_per_prompt
            per_prompt.append(row)
        n = len(prompts)
        results[name] = {
            "n": n,
            "n_prompts": len(items),
            "acc": {k: correct[k] / n for k in labels},
            "per_prompt": per_prompt,
            "images": imgs,
        }
    return results


def _mean(per_prompt, label: str, value: str) -> float:
    vals = [r[label] for r in per_prompt if r["expected"].get(label) == value]
    return sum(vals) / max(1, len(vals))


def format_table(results, command: str, sampler: dict, n_per_prompt: int, seconds: float) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Sampler: `{sampler}`; {n_per_prompt} images per prompt (seeds 0..{n_per_prompt - 1}); "
        f"classifier: bundled `load_shapes_classifier()`; took {seconds:.0f} s.",
        "",
        "| prompt set | prompts | images | measured | accuracy | target |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, label, target in ROWS:
        if name not in results or label not in results[name]["acc"]:
            continue
        r = results[name]
        acc = r["acc"][label]
        tgt = "—" if target is None else f"≥ {target:.0%}"
        ok = "" if target is None else (" ✅" if acc >= target else " ❌")
        lines.append(f"| {name} | {r['n_prompts']} | {r['n']} | {label} | {acc:.1%}{ok} | {tgt} |")
    if "canonical" in results:
        pp = results["canonical"]["per_prompt"]
        lines += ["", "Canonical prompts, accuracy by colour (colour head) and by shape (shape head):", ""]
        lines.append("| " + " | ".join(COLOURS) + " |")
        lines.append("|" + "---:|" * len(COLOURS))
        lines.append("| " + " | ".join(f"{_mean(pp, 'colour', c):.0%}" for c in COLOURS) + " |")
        lines.append("")
        lines.append("| " + " | ".join(SHAPES) + " |")
        lines.append("|" + "---:|" * len(SHAPES))
        lines.append("| " + " | ".join(f"{_mean(pp, 'shape', s):.0%}" for s in SHAPES) + " |")
    return "\n".join(lines)


def _replace_block(text: str, start: str, end: str, body: str, heading: str) -> str:
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        _, post = rest.split(end, 1)
        return pre + block + post
    return text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"


def training_summary(weights_dir: Path | None = None) -> str | None:
    """Markdown summary of ``weights/train_meta.json`` (written by the training command)."""

    path = Path(weights_dir or WEIGHTS_DIR) / "train_meta.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    a = m["args"]
    ts = m["train_seconds"]
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    cls_path = path.parent / "classifier_config.json"
    cls = json.loads(cls_path.read_text())["metrics"] if cls_path.exists() else m["classifier"]
    rec = {k.rsplit("_", 1)[-1]: v for k, v in cls.items() if k.startswith("heldout_reconstruction_acc_")}
    total_s = m.get("train_seconds_total") or sum(v for v in ts.values() if v)
    total_s += 0 if "classifier_recon_finetune" in ts else cls.get("recon_finetune_seconds", 0)
    lines = [
        f"Recorded in `weights/train_meta.json`: command `{m['command'].strip()}` (seed {m['seed']}, "
        f"{a['n_train']} rendered images, {a['captions_per_image']} captions each, "
        f"{m['n_unique_captions']} unique captions, torch threads {m['torch_threads']}).",
        "",
        "| stage | steps x batch | wall time | result |",
        "|---|---|---:|---|",
        f"| classifier | {a['steps_cls']} x 128 | {ts['classifier'] / 60:.1f} min | held-out renders: shape "
        f"{cls['heldout_acc_shape']:.1%}, "
        f"colour {cls['heldout_acc_colour']:.1%}, style {cls['heldout_acc_style']:.1%}; then fine-tuned on a "
        f"50/50 mix of renders and "
        "VAE reconstructions; on held-out reconstructions: "
        + ", ".join(f"{k} {v:.1%}" for k, v in rec.items())
        + " |",
        f"| VAE | {a['steps_vae']} x {a['batch_vae']} | {ts['vae'] / 60:.1f} min | held-out MSE "
        f"{m['vae']['heldout_mse']:.4f} (images in [-1,1]) |",
        f"| UNet | {m['unet']['steps']} x {a['batch_unet']} | {ts['unet'] / 60:.1f} min | lr {a['lr_unet']} "
        f"(warm-up + cosine), "
        f"min-SNR-{a['min_snr']:g} weighting, EMA {a['ema_decay']}; final loss "
        f"{m['unet']['history'][-1][1] if m['unet']['history'] else 'n/a'} |",
        "",
        f"Total training time (sum of stages): {total_s / 60:.1f} min "
        f"(2-core CPU, shared with other jobs).  Latent scaling factor "
        f"{m['latents']['scaling_factor']:.4f}.  "
        f"Bundled weights: {size / 1e6:.1f} MB.",
    ]
    if m["unet"].get("stopped_early"):
        lines.append(
            f"The UNet run was planned for {m['unet']['planned_steps']} steps but stopped at step "
            f"{m['unet']['steps']} "
            f"(EMA weights of that checkpoint, written with `{m.get('finalize_command', '').strip()}`) "
            f"because of the time budget."
        )
    return "\n".join(lines)


def write_docs(table: str, path: Path = DOCS) -> None:
    text = path.read_text() if path.exists() else "# The miniature world\n"
    text = _replace_block(text, START, END, table, "Quality")
    summary = training_summary()
    if summary:
        text = _replace_block(text, "<!-- training:start -->", "<!-- training:end -->", summary, "Training")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ace-diffusers shapes quality", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--n-per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weights-dir", default=None, help="weights directory (default: bundled)")
    p.add_argument(
        "--steps", type=int, default=None, help="override num_inference_steps (not for the docs table)"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="override guidance_scale (not for the docs table)"
    )
    p.add_argument("--sets", default=None, help="comma-separated subset of prompt sets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-docs", action="store_true", help="do not write docs/miniature_world.md")
    p.add_argument("--grid", default=None, help="save a PNG grid of the canonical images here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    sampler = dict(DEFAULT_SAMPLER)
    if args.steps is not None:
        sampler["num_inference_steps"] = args.steps
    if args.guidance is not None:
        sampler["guidance_scale"] = args.guidance
    t0 = time.time()
    pipe = load_shapes_pipeline(weights_dir=args.weights_dir)
    clf = load_shapes_classifier(weights_dir=args.weights_dir)
    sets = prompt_sets()
    if args.sets:
        keep = [s.strip() for s in args.sets.split(",")]
        sets = {k: v for k, v in sets.items() if k in keep}
    results = evaluate(pipe, clf, args.n_per_prompt, args.seed, args.batch_size, sets=sets, **sampler)
    seconds = time.time() - t0
    cmd = "HF_HUB_OFFLINE=1 ace-diffusers shapes quality " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = format_table(results, cmd.strip(), sampler, args.n_per_prompt, seconds)
    print(table)
    if args.grid and "canonical" in results:
        ims = (
            (results["canonical"]["images"][:: args.n_per_prompt][:64] * 255)
            .round()
            .byte()
            .permute(0, 2, 3, 1)
            .numpy()
        )
        save_grid(ims, args.grid, ncol=8)
    custom = (
        args.steps is not None
        or args.guidance is not None
        or args.sets
        or args.weights_dir
        or args.n_per_prompt < 8
    )
    if not args.no_docs:
        if custom:
            print("(non-default settings: docs not updated)")
        else:
            write_docs(table)
            print(f"wrote {DOCS}")
    return 0
