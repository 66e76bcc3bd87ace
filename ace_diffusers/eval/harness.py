"""ACE as an ``eval-unlearn`` technique (``technique: {name: ace}``), so its harness metrics run on ACE.

eval-unlearn (a published unlearning benchmark harness) finds techniques through the entry-point group
``eval_unlearn.techniques``; ace-diffusers registers :class:`ACETechnique` there as ``ace`` (install
with ``pip install "ace-diffusers[eval-unlearn]"``). The harness builds a technique with the keyword
arguments of its config's ``technique.config`` and calls ``generate(prompts, seed=None)``, which returns
one PIL image per prompt. ``docs/guides/evaluate.md`` has a complete config for a GPU machine.

The technique loads ``model_id`` with diffusers, then either loads a published adapter (``adapter``:
a Hub repo id or a folder, with ``revision``/``subfolder``) or fits one for ``concepts`` (closed form,
or ``method: ace`` for closed form + fine-tuning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import ACEValueError
from ..fitting.erase import erase_concept
from ..fitting.trainer import ACETrainer
from ..integration.carriers import attach_everywhere

METHODS = ("closed-form", "ace")


@dataclass
class TechniqueConfig:
    """What ``technique.config`` may hold (unknown keys are refused, naming the known ones)."""

    model_id: str = "CompVis/stable-diffusion-v1-4"  # the harness's usual SD base
    adapter: str | None = None  # a published adapter (Hub repo id or folder) instead of fitting
    revision: str | None = None
    subfolder: str | None = None
    concepts: list[str] = field(default_factory=list)
    kind: str | None = None  # object, style, celebrity, explicit
    neutral: str | None = None
    method: str = "closed-form"
    device: str | None = None  # default: cuda when available
    use_fp16: bool | None = None  # default: on cuda
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    pipeline: Any = None  # an already built pipeline (in-process use); model_id is then ignored

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TechniqueConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ACEValueError(f"Unknown ace technique setting(s) {unknown}; known: {sorted(known)}.")
        config = cls(**kwargs)
        if isinstance(config.concepts, str):
            config.concepts = [config.concepts]
        if config.method not in METHODS:
            raise ACEValueError(f"method must be one of {list(METHODS)}, got {config.method!r}.")
        if (config.adapter is None) == (not config.concepts):
            raise ACEValueError(
                "The ace technique needs exactly one of 'adapter' (a published adapter to load) and "
                "'concepts' (concepts to erase now)."
            )
        return config


class ACETechnique:
    """eval-unlearn technique ``ace``: a diffusers pipeline with an ACE erasure loaded."""

    def __init__(self, **kwargs: Any) -> None:
        self.config = config = TechniqueConfig.from_kwargs(kwargs)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = config.pipeline if config.pipeline is not None else _load_pipeline(config, device)
        if config.adapter is not None:
            self.adapter_name = self.pipe.load_ace_adapter(
                config.adapter, revision=config.revision, subfolder=config.subfolder
            )
        elif config.method == "ace":
            trainer = ACETrainer(self.pipe, config.concepts, kind=config.kind, neutral=config.neutral)
            adapter = trainer.fit()
            self.adapter_name = "ace"
            attach_everywhere(self.pipe, adapter, self.adapter_name)
        else:
            erase_concept(self.pipe, config.concepts, kind=config.kind, neutral=config.neutral)
            self.adapter_name = self.pipe.get_list_ace_adapters()[-1]
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, prompts: list[str], seed: int | None = None, **kwargs: Any) -> list:
        """One PIL image per prompt; ``seed`` makes the batch reproducible (prompt i gets seed + i)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.pipe.device
        generator = None if seed is None else [
            torch.Generator(device=device).manual_seed(seed + i) for i in range(len(prompts))
        ]
        call = {
            "num_inference_steps": self.config.num_inference_steps,
            "guidance_scale": self.config.guidance_scale,
            **kwargs,
        }
        return list(self.pipe(prompts, generator=generator, **call).images)


def _load_pipeline(config: TechniqueConfig, device: str) -> Any:
    fp16 = config.use_fp16 if config.use_fp16 is not None else device.startswith("cuda")
    pipe = DiffusionPipeline.from_pretrained(config.model_id, torch_dtype=torch.float16 if fp16 else None)
    return pipe.to(device)
