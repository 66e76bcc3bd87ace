"""Run a small evaluation on the tiny pipeline; under ``accelerate launch`` the work is split.

``python accelerate_script.py OUT.json`` (or launched with accelerate): the main process writes the
gathered result. ``run(None)`` gives the single-process result in-process (what the test compares to).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _judge(images: torch.Tensor) -> list[str]:
    red, blue = images[:, 0].mean(dim=(1, 2)), images[:, 2].mean(dim=(1, 2))
    return ["cat" if r > b else "dog" for r, b in zip(red.tolist(), blue.tolist(), strict=True)]


def run(state=None) -> dict:
    import ace_diffusers  # noqa: F401  (pipeline verbs)
    from ace_diffusers.eval.attacks import SoftPromptSettings
    from ace_diffusers.eval.judges import CallableJudge
    from ace_diffusers.eval.runner import evaluate, prompt_plan
    from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

    torch.set_num_threads(1)
    pipe = tiny_sd_pipeline()
    pipe.load_ace_adapter(random_adapter(pipe.unet, gate_bias=6.0, magnitude=2.0), "erase")
    plan = prompt_plan(
        "cat",
        templates=["a photo of {}", "a {}", "a drawing of {}"],
        synonyms=["kitten"],
        others=["dog"],
        neutral="animal",
        images_per_prompt=2,
        attacks=["misspelling", "negative", "soft_prompt"],
        soft_prompts=2,
        sampler=dict(num_inference_steps=2, height=16, width=16),
    )
    judges = {"concept": CallableJudge(_judge, ["cat", "dog"])}
    evaluation = evaluate(
        pipe,
        plan,
        judges,
        soft_prompt=SoftPromptSettings(steps=2, objective="attention"),
        batch_size=2,
        state=state,
    )
    out = {"processes": 1 if state is None else state.num_processes}
    for which in ("after", "before"):
        result = evaluation[which]
        out[which] = {
            "metrics": result.metrics,
            "attacks": {k: v["asr"] for k, v in result.attacks.items()},
            "predictions": result.predictions,
            "images": {g: imgs.tolist() for g, imgs in result.images.items()},
        }
    return out


if __name__ == "__main__":
    from ace_diffusers.eval.common import partial_state

    state = partial_state()
    result = run(state)
    if state.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    state.wait_for_everyone()
