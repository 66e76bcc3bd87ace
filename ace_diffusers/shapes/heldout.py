"""The development held-out split: for every shape, words never in a training caption that the base
model nevertheless draws as that shape (>= 50 % of images).

    HF_HUB_OFFLINE=1 ace-diffusers shapes heldout

The sweep ranks the text encoder's whole WordPiece vocabulary (whole words of three letters or more that
no training caption contains) by how close ``"a {word}"`` lies to each shape's trained words in the
encoder's mean-pooled output, keeps the ``--per-shape`` nearest words of each shape, generates
``a {colour} {word}`` for all eight colours (``--images`` per word) and keeps the words the classifier
sees as the shape at least half the time. The words and the sweep's table go to
``ace_diffusers/data/shapes_heldout.json`` and ``docs/miniature_world.md``.

These words are for evaluation only: nothing in the package's stack reads the world (a test checks it).
"""

from __future__ import annotations

import json
import re
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .. import helptext
from .._io import atomic_write_json, atomic_write_text
from ..stats import wilson_interval
from . import vocab
from .classifier import load_shapes_classifier
from .pipeline import generate, load_shapes_pipeline
from .quality_report import DOCS, replace_block
from .vocab import COLOURS, SHAPE_WORDS, SHAPES, article_fix

HELDOUT_FILE = Path(str(resources.files("ace_diffusers").joinpath("data/shapes_heldout.json")))
MARKERS = ("<!-- heldout:start -->", "<!-- heldout:end -->")
MIN_RATE = 0.5


def training_words() -> set[str]:
    """Every word of every caption list in :mod:`vocab` (lower case, split at spaces and hyphens)."""
    texts: list[str] = [*vocab.TEMPLATES, *vocab.PAIR_TEMPLATES, *vocab.NEUTRAL_PHRASES, *vocab.NEUTRAL_NOUNS]
    for table in (vocab.SHAPE_WORDS, vocab.STYLE_WORDS, vocab.COLOUR_WORDS):
        texts += [w for words in table.values() for w in words]
    return {w for t in texts for w in re.split(r"[^a-z]+", t.lower()) if w}


def candidate_words(tokenizer) -> list[str]:
    """Whole, alphabetic vocabulary entries (three letters or more) that no training caption contains."""
    seen = training_words()
    return sorted(
        w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3 and w not in seen
    )


@torch.no_grad()
def pooled(pipe, prompts: list[str], batch_size: int = 512) -> torch.Tensor:
    """Unit-length mean-pooled text-encoder outputs (padding left out)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = pipe.tokenizer(prompts[i : i + batch_size], padding=True, return_tensors="pt")
        hidden = pipe.text_encoder(**tok).last_hidden_state
        mask = tok["attention_mask"][..., None].to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def nearest_words(pipe, words: list[str], per_shape: int) -> dict[str, list[str]]:
    """For every shape, the ``per_shape`` candidate words closest to it (and closer to it than to others)."""
    anchors = torch.stack(
        [pooled(pipe, [f"a {w}" for w in SHAPE_WORDS[s]]).mean(0) for s in SHAPES]
    )  # (8, d)
    sim = pooled(pipe, [f"a {w}" for w in words]) @ torch.nn.functional.normalize(anchors, dim=-1).T
    best = sim.argmax(1)
    out = {}
    for k, shape in enumerate(SHAPES):
        own = (best == k).nonzero()[:, 0]
        order = own[sim[own, k].argsort(descending=True)][:per_shape]
        out[shape] = [words[int(i)] for i in order]
    return out


def sweep(pipe, classifier, candidates: dict[str, list[str]], images: int, seed: int = 0) -> list[dict]:
    """Generate ``a {colour} {word}`` (``images`` per word over the 8 colours) and judge the shape."""
    per_colour = -(-images // len(COLOURS))
    items = [(s, w) for s, ws in candidates.items() for w in ws]
    prompts = [article_fix(f"a {c} {w}") for _, w in items for c in COLOURS for _ in range(per_colour)]
    seeds = [seed + k for _ in items for _ in COLOURS for k in range(per_colour)]
    shapes = classifier.predict(generate(pipe, prompts, seeds=seeds))["shape"]
    n = len(COLOURS) * per_colour
    rows = []
    for j, (shape, word) in enumerate(items):
        hits = sum(p == shape for p in shapes[j * n : (j + 1) * n])
        rows.append({"shape": shape, "word": word, "hits": hits, "n": n, "rate": hits / n})
    return rows


def format_table(rows: list[dict], command: str, seconds: float) -> str:
    lines = [
        f"Command: `{command}` (took {seconds:.0f} s). A word joins the split when the base model draws it "
        f"as its shape in at least {MIN_RATE:.0%} of its images.",
        "",
        "| shape | word | images | drawn as the shape | 95 % interval | held out |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        lo, hi = wilson_interval(r["hits"], r["n"])
        mark = "✅" if r["rate"] >= MIN_RATE else ""
        lines.append(
            f"| {r['shape']} | {r['word']} | {r['n']} | {r['rate']:.0%} | {lo:.0%} – {hi:.0%} | {mark} |"
        )
    return "\n".join(lines)


def heldout_words() -> dict[str, list[str]]:
    """The recorded split ``{shape: [words]}`` (empty lists until the sweep has run)."""
    if not HELDOUT_FILE.exists():
        return {s: [] for s in SHAPES}
    return json.loads(HELDOUT_FILE.read_text())["words"]


def main(argv: list[str] | None = None) -> int:
    p = helptext.parser("shapes heldout", __doc__, first_paragraph=True)
    p.add_argument("--per-shape", type=int, default=10, help="nearest candidate words tried per shape")
    p.add_argument("--images", type=int, default=32, help="images per candidate word (over the 8 colours)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; do not write the split and the docs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe, classifier = load_shapes_pipeline(), load_shapes_classifier()
    candidates = nearest_words(pipe, candidate_words(pipe.tokenizer), args.per_shape)
    rows = sweep(pipe, classifier, candidates, args.images, args.seed)
    cmd = "HF_HUB_OFFLINE=1 ace-diffusers shapes heldout " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = format_table(rows, cmd.strip(), time.time() - t0)
    print(table)
    if not args.no_write:
        words = {s: [r["word"] for r in rows if r["shape"] == s and r["rate"] >= MIN_RATE] for s in SHAPES}
        atomic_write_json(
            HELDOUT_FILE, {"command": cmd.strip(), "min_rate": MIN_RATE, "words": words, "sweep": rows}
        )
        text = DOCS.read_text() if DOCS.exists() else "# The miniature world\n"
        atomic_write_text(DOCS, replace_block(text, MARKERS, table, "Held-out words"))
        print(f"wrote {HELDOUT_FILE} and {DOCS}")
    return 0
