"""UCE and ESD-x baselines on the tiny pipeline: mechanics, exact undo, and the closed form itself."""

import pytest
import torch

from ace_diffusers.errors import ACECompatibilityError, ACEValueError
from ace_diffusers.eval.baselines import WeightEdit, esd_x_erase, uce_erase, uce_text_map

from ..conftest import generate


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(module, snapshot, names=None):
    return all(
        torch.equal(p, snapshot[n]) for n, p in module.named_parameters() if names is None or n in names
    )


def _images(pipe, prompt):
    return generate(pipe, prompt, seed=0, steps=2)


def test_uce_text_map_solves_the_published_normal_equations():
    g = torch.Generator().manual_seed(0)
    c, n, p = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    G = uce_text_map(c, n, p, erase_scale=2.0, preserve_scale=0.5, lamb=0.1)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    W_new = W @ G
    eye = torch.eye(8, dtype=torch.float64)
    c, n, p = c.double(), n.double(), p.double()
    lhs = W_new @ (0.1 * eye + 2.0 * c.T @ c + 0.5 * p.T @ p)
    rhs = 0.1 * W + 2.0 * (W @ n.T) @ c + 0.5 * (W @ p.T) @ p
    assert torch.allclose(lhs, rhs, atol=1e-9)
    # with a vanishing ridge and nothing to preserve, concept tokens map exactly onto their targets
    G0 = uce_text_map(c[:1], n[:1], lamb=1e-9)
    assert torch.allclose(c[:1] @ G0.T, n[:1], atol=1e-5)
    with pytest.raises(ACEValueError):
        uce_text_map(c, n[:2])


def test_uce_edits_only_cross_attention_kv_and_undoes_exactly(sd_pipe):
    unet = sd_pipe.unet
    before = _snapshot(unet)
    cat0, dog0 = _images(sd_pipe, "a photo of a cat"), _images(sd_pipe, "a photo of a dog")
    edit = uce_erase(sd_pipe, "cat", "animal", ["dog"], templates=["a photo of a {}", "{}"])
    assert isinstance(edit, WeightEdit) and edit.method == "uce" and edit.seconds > 0 and edit.applied
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("attn2.to_k" in n or "attn2.to_v" in n for n in changed)
    assert changed == set(edit.parameters)
    assert edit.stats["concept_residual"] < 0.2  # concept tokens land near the anchor's
    cat1 = _images(sd_pipe, "a photo of a cat")
    assert not torch.allclose(cat1, cat0, atol=1e-4)
    with edit.original():  # temporarily the original model, bit-exact
        assert _same(unet, before)
        assert torch.equal(_images(sd_pipe, "a photo of a cat"), cat0)
    assert torch.equal(_images(sd_pipe, "a photo of a cat"), cat1)  # and the edit is back
    edit.restore()
    assert _same(unet, before) and not edit.applied
    assert torch.equal(_images(sd_pipe, "a photo of a dog"), dog0)
    edit.reapply()
    assert torch.equal(_images(sd_pipe, "a photo of a cat"), cat1)
    with edit:
        pass
    assert _same(unet, before)
    info = edit.to_dict()
    assert info["settings"]["lamb"] == 0.5 and info["parameters"] == len(changed)


def test_uce_validates_arguments(sd_pipe):
    with pytest.raises(ACEValueError):
        uce_erase(sd_pipe, [], "animal")
    with pytest.raises(ACEValueError):
        uce_erase(sd_pipe, ["cat", "dog"], ["a", "b", "c"])
    with pytest.raises(ACEValueError):
        uce_erase(sd_pipe, "cat", "animal", lamb=0.0)
    with pytest.raises(ACEValueError):
        uce_erase(sd_pipe, "cat", "animal", templates=["no slot"])


def test_uce_empty_anchor_and_sdxl(sdxl_pipe):
    before = _snapshot(sdxl_pipe.unet)
    edit = uce_erase(sdxl_pipe, ["cat", "dog"], "", ["car"])  # several concepts, towards the empty prompt
    assert edit.stats["concept_tokens"] == 2
    edit.restore()
    assert _same(sdxl_pipe.unet, before)


def test_esd_x_fine_tunes_cross_attention_and_undoes_exactly(sd_pipe):
    unet = sd_pipe.unet
    before = _snapshot(unet)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    cat0 = _images(sd_pipe, "cat")
    edit = esd_x_erase(
        sd_pipe,
        "cat",
        steps=3,
        learning_rate=1e-3,
        trajectories=2,
        num_inference_steps=3,
        height=16,
        width=16,
        batch_size=2,
    )
    assert edit.method == "esd-x" and edit.stats["bank_size"] == 2 * 2  # 2 trajectories x (3 steps - first)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("attn2" in n for n in changed) and changed <= set(edit.parameters)
    assert any(".to_q." in n or ".to_out." in n for n in changed)  # ESD-x: all of attn2
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert all(p.grad is None for p in unet.parameters())
    assert not torch.allclose(_images(sd_pipe, "cat"), cat0, atol=1e-4)
    edit.restore()
    assert _same(unet, before)
    assert torch.equal(_images(sd_pipe, "cat"), cat0)
    assert edit.settings["negative_guidance"] == 1.0 and edit.settings["parameters"] == "xattn"


def test_esd_x_kv_only_and_validation(sd_pipe, sdxl_pipe):
    before = _snapshot(sd_pipe.unet)
    edit = esd_x_erase(
        sd_pipe,
        "cat",
        steps=2,
        learning_rate=1e-3,
        parameters="kv",
        trajectories=1,
        num_inference_steps=2,
        height=16,
        width=16,
        prompts=["a photo of a cat"],
    )
    changed = {n for n, p in sd_pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    edit.restore()
    assert _same(sd_pipe.unet, before)
    with pytest.raises(ACEValueError):
        esd_x_erase(sd_pipe, "cat", parameters="everything")
    with pytest.raises(ACEValueError):
        esd_x_erase(sd_pipe, "", steps=1)
    with pytest.raises(ACECompatibilityError):
        esd_x_erase(sdxl_pipe, "cat", steps=1)


def test_baseline_before_after_evaluation(sd_pipe):
    """A baseline's undo handle gives the evaluator its 'before' model."""
    from ace_diffusers.eval.judges import CallableJudge
    from ace_diffusers.eval.runner import evaluate, prompt_plan

    plan = prompt_plan(
        "cat",
        templates=["a photo of {}"],
        others=["dog"],
        images_per_prompt=1,
        attacks=[],
        sampler=dict(num_inference_steps=2, height=16, width=16),
    )

    def judge(images):
        return ["cat" if float(x[0].mean()) > float(x[2].mean()) else "dog" for x in images]

    judges = {"concept": CallableJudge(judge, ["cat", "dog"])}
    clean = evaluate(sd_pipe, plan, judges, before=False)
    edit = uce_erase(sd_pipe, "cat", "animal")
    result = evaluate(sd_pipe, plan, judges, original=edit.original)
    assert result["before"].predictions == clean["after"].predictions
    assert edit.applied


def test_uce_aligned_tokens_variant(sd_pipe):
    before = _snapshot(sd_pipe.unet)
    last = uce_erase(sd_pipe, "cat", "animal", ["dog"], templates=["a photo of a {}"])
    last_weights = {n: p.detach().clone() for n, p in last.parameters.items()}
    last.restore()
    aligned = uce_erase(sd_pipe, "cat", "animal", ["dog"], templates=["a photo of a {}"], tokens="aligned")
    assert aligned.stats["concept_tokens"] > last.stats["concept_tokens"] == 1
    assert aligned.stats["preserve_tokens"] == 77  # every token of the preserved prompt
    assert any(not torch.equal(p, last_weights[n]) for n, p in aligned.parameters.items())
    aligned.restore()
    assert _same(sd_pipe.unet, before)
    with pytest.raises(ACEValueError):
        uce_erase(sd_pipe, "cat", "animal", tokens="some")
