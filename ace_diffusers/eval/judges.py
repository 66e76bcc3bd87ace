"""Judges: whatever turns generated images into labels (``Judge.predict(images) -> list[str]``).

* :class:`ShapesJudge` — one head of the miniature world's bundled classifier: ``shape`` (``none``
  when nothing is drawn), ``style`` or ``colour`` of the image's main object, or the same per slot of
  a two-object scene (``left_shape`` ... ``right_style``); :func:`shapes_judges` builds them all;
* :class:`CLIPZeroShotJudge` — zero-shot classification with any ``transformers.CLIPModel`` over label
  prompts (MACE judges objects and celebrities with CLIP/GCD-style classifiers the same way);
* :class:`CallableJudge` — wrap any function ``images -> labels`` (a NudeNet detector, a style
  classifier, ...).

Images are float tensors ``(N, 3, H, W)`` in ``[0, 1]`` — what ``pipe(..., output_type="pt")`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ACEValueError
from ..shapes.classifier import HEADS, SLOT_KEYS, load_shapes_classifier

# CLIP's image normalisation (OpenAI), used when no image processor is given.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Judge:
    """Interface: ``labels`` (the label set) and ``predict(images) -> list[str]`` (one label per image)."""

    labels: list[str]

    def predict(self, images: torch.Tensor) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> list[str]:
        return self.predict(images)


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ACEValueError(f"A judge takes float images (N, 3, H, W) in [0, 1]; got {shape}.")
    return images


class ShapesJudge(Judge):
    """One head of the miniature world's classifier (``load_shapes_classifier()`` if none is given)."""

    def __init__(self, classifier: Any = None, head: str = "shape") -> None:
        if head not in HEADS and head not in SLOT_KEYS:
            raise ACEValueError(f"Unknown head {head!r}; choose one of {sorted(HEADS) + SLOT_KEYS}.")
        if classifier is None:

            classifier = load_shapes_classifier()
        self.classifier = classifier
        self.head = head
        self.labels = list(HEADS[head.rsplit("_", 1)[-1]])

    def predict(self, images: torch.Tensor) -> list[str]:
        images = _check_images(images)
        if len(images) == 0:
            return []
        return list(self.classifier.predict(images)[self.head])


def shapes_judges(classifier: Any = None, heads: Sequence[str] | None = None) -> dict[str, ShapesJudge]:
    """A :class:`ShapesJudge` per head (all image-level and per-slot heads by default), one classifier."""
    classifier = classifier if classifier is not None else load_shapes_classifier()
    return {h: ShapesJudge(classifier, h) for h in (heads or [*HEADS, *SLOT_KEYS])}


class CallableJudge(Judge):
    """Any function ``images -> list of labels`` as a judge."""

    def __init__(self, function: Callable[[torch.Tensor], Sequence[str]], labels: Sequence[str]) -> None:
        self.function = function
        self.labels = list(labels)

    def predict(self, images: torch.Tensor) -> list[str]:
        out = [str(x) for x in self.function(_check_images(images))]
        if len(out) != len(images):
            raise ACEValueError(f"The judge function returned {len(out)} labels for {len(images)} images.")
        return out


class CLIPZeroShotJudge(Judge):
    """Zero-shot CLIP: each image gets the label whose prompt(s) it matches best.

    Args:
        model: a ``transformers.CLIPModel``.
        processor: a ``CLIPProcessor`` (tokenizer + image processor) or just a tokenizer; its image
            processor's size, mean and std are used when present (else CLIP's defaults and the vision
            tower's ``image_size``).
        labels: the label set; e.g. ``["Van Gogh", "Monet", "art"]`` — include the neutral anchor so
            that erased images have somewhere to go.
        templates: prompt templates per label (text features are averaged over them, CLIP-style).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        labels: Sequence[str],
        *,
        templates: Sequence[str] = ("a photo of {}", "an image of {}", "{}"),
        tokenizer: Any = None,
        batch_size: int = 32,
    ) -> None:
        labels = [str(x) for x in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ACEValueError(f"A zero-shot judge needs at least two distinct labels, got {labels}.")
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ACEValueError("Each CLIP template must contain '{}' exactly once.")
        self.model = model
        self.labels = labels
        self.templates = list(templates)
        self.batch_size = batch_size
        self.tokenizer = tokenizer or getattr(processor, "tokenizer", None) or processor
        image_processor = getattr(processor, "image_processor", None)
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        self.mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        self._text_features: torch.Tensor | None = None

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected feature
        if isinstance(output, torch.Tensor):
            return output
        return output.pooler_output

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        if self._text_features is None:
            device = next(self.model.parameters()).device
            prompts = [t.format(label) for label in self.labels for t in self.templates]
            max_length = min(
                getattr(self.tokenizer, "model_max_length", 77) or 77,
                self.model.config.text_config.max_position_embeddings,
            )
            tokens = self.tokenizer(
                prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            feats = self._features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(device),
                    attention_mask=tokens["attention_mask"].to(device),
                )
            ).float()
            feats = F.normalize(feats, dim=-1).view(len(self.labels), len(self.templates), -1).mean(1)
            self._text_features = F.normalize(feats, dim=-1)
        return self._text_features

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the short side to ``image_size`` (bicubic), centre-crop, normalise — CLIP's recipe."""
        images = _check_images(images).float().clamp(0, 1)
        h, w = images.shape[-2:]
        size = self.image_size
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        if (new_h, new_w) != (h, w):
            images = F.interpolate(
                images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=scale < 1
            )
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top : top + size, left : left + size].clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(N, len(labels))`` between images and label prompts."""
        text = self.text_features()
        device = text.device
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(device, dtype)
            feats = self._features(self.model.get_image_features(pixel_values=pixels)).float()
            out.append(F.normalize(feats, dim=-1) @ text.T)
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, images: torch.Tensor) -> list[str]:
        images = _check_images(images)
        if len(images) == 0:
            return []
        return [self.labels[i] for i in self.scores(images).argmax(-1).tolist()]
