"""The miniature world: a tiny text-to-image Stable Diffusion pipeline trained on rendered shapes.

It exists so that concept erasure can be *measured* on a CPU: a real diffusers
``StableDiffusionPipeline`` (UNet with ``attn2`` cross-attention, AutoencoderKL, a frozen BERT text
encoder) that draws 32x64 scenes with nothing, one or two coloured, styled shapes, plus a classifier that
says what each half of a scene shows (``none`` for an empty one).

Heavy imports (torch, diffusers) are deferred to the submodules.
"""

from .vocab import COLOUR_WORDS, COLOURS, NONE, SHAPE_WORDS, SHAPES, SLOTS, STYLE_WORDS, STYLES  # noqa: F401

__all__ = ["COLOURS", "SHAPES", "STYLES", "SHAPE_WORDS", "STYLE_WORDS", "COLOUR_WORDS", "NONE", "SLOTS"]
