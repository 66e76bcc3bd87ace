"""Cross-attention transformers (PixArt-α, Sana): the same verbs as on UNets, on tiny models from configs."""

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from ace_diffusers.core.processor import ACESanaAttnProcessor
from ace_diffusers.deploy.export import export_lora
from ace_diffusers.errors import ACECompatibilityError, ACEValueError
from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.integration.attach import attach_adapter, detach_adapter, set_active_adapters
from ace_diffusers.integration.modules import attention_modules, context_projection, get_unet
from ace_diffusers.testing import random_adapter
from ace_diffusers.testing_transformers import tiny_pixart_pipeline, tiny_sana_transformer

PROMPT, UNRELATED = "a painting by Van Gogh", "a photo of a cat"
CORE = FitSettings(neighbours=0, context_prompts=0)  # random tiny T5: mined words and pairings mean nothing


def _generate(pipe, prompt=PROMPT, **kwargs):
    """Two steps at 32x32 with a fixed seed, as tensors (``kwargs`` add to or override those)."""
    call = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**call, **kwargs}).images


FAMILY_CALLS = {  # what each tiny transformer pipeline is called with besides _generate's defaults
    "pixart": {"clean_caption": False, "use_resolution_binning": False},
    "sana": {"height": 256, "width": 256, "output_type": "latent", "use_resolution_binning": False},
}


def _family_pipeline(family):
    from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

    builders = {"sd3": tiny_sd3_pipeline, "pixart": tiny_pixart_pipeline, "flux": tiny_flux_pipeline}
    return {**builders, "sana": tiny_sana_pipeline}[family]()


def _images(pipe, prompt=PROMPT):
    """:func:`_generate` for PixArt (no caption cleaning, no resolution binning at 32x32)."""
    return _generate(pipe, prompt, **FAMILY_CALLS["pixart"])


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline(text_dim=64, width=32)


def test_the_transformer_is_the_denoiser_and_its_caption_projection_the_context_map(pixart):
    assert get_unet(pixart) is pixart.transformer
    assert context_projection(pixart.transformer) is pixart.transformer.caption_projection
    sana = tiny_sana_transformer()
    mapped = context_projection(sana)
    assert list(mapped) == [sana.caption_projection, sana.caption_norm]
    assert TextEmbedder(pixart).max_length == 120  # PixArt-α's max_sequence_length default


def test_an_adapter_on_pixart_is_bit_identical_when_off_and_gone_when_unloaded(pixart):
    base = _images(pixart)
    pixart.load_ace_adapter(random_adapter(pixart.transformer, rank=4), adapter_name="r")
    assert not torch.equal(_images(pixart), base)
    pixart.set_ace_adapters("r", 0.0)
    assert torch.equal(_images(pixart), base)
    pixart.unload_ace_adapter("r")
    assert torch.equal(_images(pixart), base)
    assert {type(m.processor) for m in attention_modules(pixart.transformer).values()} == {AttnProcessor2_0}


def _read_by_cross_attention(pipe, generate):
    """The context the first cross-attention receives for the prompt while ``generate()`` runs (with
    classifier-free guidance the batch is [negative, prompt])."""
    seen = []
    attn = next(m for n, m in pipe.transformer.named_modules() if n.endswith("attn2"))
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        generate()
    finally:
        handle.remove()
    return seen[0][1]


def test_the_fitted_context_is_what_pixarts_cross_attention_reads(pixart):
    conditional = _read_by_cross_attention(pixart, lambda: _images(pixart, PROMPT))
    (row,) = TextEmbedder(pixart).encode([PROMPT])
    assert row.length == row.embeddings.shape[0] < conditional.shape[0]  # padding, masked out, is left out
    torch.testing.assert_close(row.embeddings, conditional[: row.length], atol=1e-5, rtol=0)


def test_the_fit_reads_a_cased_prompt_as_pixart_does_lowercased():
    """PixArt lowercases every prompt before its (case-sensitive, like real T5's) tokenizer sees it: the
    fit's rows are those of the lowercased prompt, and the concept's span is found in it."""
    pixart = tiny_pixart_pipeline(text_dim=64, width=32, cased=True)
    conditional = _read_by_cross_attention(pixart, lambda: _images(pixart, PROMPT))
    (row,) = TextEmbedder(pixart).encode([PROMPT], [(14, 22)])
    torch.testing.assert_close(row.embeddings, conditional[: row.length], atol=1e-5, rtol=0)
    assert row.span == (3, 5)  # "van", "gogh": whole pieces once lowercased (capitals would be spelled)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_sanas_cross_attention_carries_ace_and_its_linear_attention_stays(qk_norm):
    sana = tiny_sana_transformer(qk_norm=qk_norm).eval()
    generator = torch.Generator().manual_seed(0)
    latents, context = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 6, 32, generator=generator),
    )
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0

    def run():
        with torch.no_grad():
            return sana(
                latents,
                encoder_hidden_states=context,
                timestep=torch.tensor([10, 500]),
                encoder_attention_mask=mask,
            ).sample

    base = run()
    before = {n: type(m.processor) for n, m in attention_modules(sana).items()}
    attach_adapter(sana, random_adapter(sana, rank=4), "a")
    kinds = {n: type(m.processor) for n, m in attention_modules(sana).items()}
    assert {k for n, k in kinds.items() if n.endswith("attn2")} == {ACESanaAttnProcessor}
    assert {n: k for n, k in kinds.items() if n.endswith("attn1")} == {
        n: k for n, k in before.items() if n.endswith("attn1")
    }
    assert not torch.equal(run(), base)
    requested = {
        f"{name}.processor": SanaAttnProcessor2_0() if name.endswith("attn2") else module.processor
        for name, module in attention_modules(sana).items()
    }
    sana.set_attn_processor(requested)
    assert {type(sana.transformer_blocks[0].attn2.processor)} == {ACESanaAttnProcessor}
    assert not torch.equal(run(), base)  # a stock Sana processor set under ACE keeps the erasure
    set_active_adapters(sana, "a", 0.0)
    assert torch.equal(run(), base)
    detach_adapter(sana, "a")
    assert (
        torch.equal(run(), base)
        and {n: type(m.processor) for n, m in attention_modules(sana).items()} == before
    )


def test_erase_fuse_unfuse_and_export_on_pixart(pixart, tmp_path):
    base, base_unrelated = _images(pixart), _images(pixart, UNRELATED)
    adapter = pixart.erase_concept("Van Gogh", kind="style", settings=CORE, adapter_name="vg")
    assert set(adapter.layers) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    gated = _images(pixart)
    assert (gated - base).norm() > 0.1
    before = {k: v.clone() for k, v in pixart.transformer.state_dict().items()}
    pixart.fuse_ace_adapter("vg")
    fused = _images(pixart)
    assert (fused - gated).norm() < 0.3 * (gated - base).norm()
    path = export_lora(pixart, tmp_path / "lora.safetensors", format="diffusers")
    with pytest.raises(ACEValueError, match="kohya layout names UNet modules"):
        export_lora(pixart, tmp_path / "kohya.safetensors", format="kohya")
    pixart.unfuse_ace_adapter()
    assert all(torch.equal(before[k], v) for k, v in pixart.transformer.state_dict().items())
    pixart.unload_ace_adapter("vg")
    assert torch.equal(_images(pixart, UNRELATED), base_unrelated)
    # diffusers has no LoRA loader for PixArt; PEFT reads the file (docs/deploy.md has the recipe)
    config = json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
    fresh = tiny_pixart_pipeline(text_dim=64, width=32)
    inject_adapter_in_model(
        LoraConfig(
            r=config["transformer.r"],
            lora_alpha=config["transformer.lora_alpha"],
            target_modules=config["transformer.target_modules"],
        ),
        fresh.transformer,
    )
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    assert not set_peft_model_state_dict(fresh.transformer, state).unexpected_keys
    torch.testing.assert_close(_images(fresh), fused, atol=1e-5, rtol=0)


def test_the_trainer_fine_tunes_pixart_on_its_masked_t5_prompts(tmp_path):
    """PixArt's cross-attention never reads the padding of a T5 prompt: the trainer's attention targets
    mask it the same way, its adversaries go through T5 and the caption projection, and the fine-tuned
    adapter changes the concept more than an unrelated prompt (a random tiny T5 separates them only
    roughly — its closed form alone changes the two about alike; mined words would be random words)."""
    from ace_diffusers import ACETrainer

    pipe = tiny_pixart_pipeline(text_dim=64, width=32)
    before = {p: _images(pipe, p) for p in (PROMPT, UNRELATED)}
    trainer = ACETrainer(
        pipe, "Van Gogh", kind="style", steps=30, adversarial_every=10, adversarial_steps=2,
        mined_synonyms=0, queries_per_layer=16, batch_size=8, progress=False,
    )
    adapter = trainer.fit()
    assert adapter.method == "ace" and adapter.fit["fine_tuning"]["adversaries_found"] > 0
    assert trainer.final_loss < trainer.initial_loss
    pipe.load_ace_adapter(adapter, adapter_name="vg")
    concept_change = (_images(pipe) - before[PROMPT]).abs().max()
    assert concept_change > 1.5 * (_images(pipe, UNRELATED) - before[UNRELATED]).abs().max()


def _sana_latents(pipe, prompt=PROMPT):
    return _generate(pipe, prompt, **FAMILY_CALLS["sana"])


def test_sanas_prompts_are_fitted_behind_its_instruction_as_its_cross_attention_reads_them():
    """Sana writes its long instruction in front of every prompt and keeps BOS and the last rows: the fit
    reads exactly the rows the first cross-attention receives (the valid ones: the rest is masked out),
    finds the concept among them and fits a closed form that changes the concept's latents more than an
    unrelated prompt's (a random tiny Gemma separates them only roughly); fusing (baked on those rows) and
    unfusing are bit-exact, and so is unloading."""
    from ace_diffusers.testing_transformers import tiny_sana_pipeline

    pipe = tiny_sana_pipeline()
    conditional = _read_by_cross_attention(pipe, lambda: _sana_latents(pipe))
    before = {p: _sana_latents(pipe, p) for p in (PROMPT, UNRELATED)}
    (row,) = TextEmbedder(pipe).encode([PROMPT], [(14, 22)])
    assert row.length < conditional.shape[0]  # the kept rows' padding, masked out, is left out
    torch.testing.assert_close(row.embeddings, conditional[: row.length], atol=1e-5, rtol=0)
    assert row.span is not None and row.span[1] == row.length  # "van gogh": the prompt's last rows
    pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg", settings=CORE)
    concept_change = (_sana_latents(pipe) - before[PROMPT]).abs().max()
    assert concept_change > (_sana_latents(pipe, UNRELATED) - before[UNRELATED]).abs().max()
    gated, weights = _sana_latents(pipe), {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.fuse_ace_adapter("vg")
    assert not torch.equal(_sana_latents(pipe), before[PROMPT])
    pipe.unfuse_ace_adapter()
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(_sana_latents(pipe), gated)
    pipe.unload_ace_adapter("vg")
    assert torch.equal(_sana_latents(pipe), before[PROMPT])


def test_the_trainer_fine_tunes_sana_behind_its_instruction():
    """The adversaries read a prompt as Sana does (behind its instruction, the kept rows, padding masked):
    unperturbed, their encoder path gives exactly the fixed prompts' rows, the concept's tokens are found
    behind the prefix, and the fine-tuned adapter lowers the loss and changes the concept's latents more
    than an unrelated prompt's (a random tiny Gemma separates them only roughly)."""
    from ace_diffusers import ACETrainer
    from ace_diffusers.fitting.adversary import concept_tokens, run_encoder
    from ace_diffusers.fitting.attention import encode_full
    from ace_diffusers.testing_transformers import tiny_sana_pipeline

    pipe = tiny_sana_pipeline()
    embedder = TextEmbedder(pipe)
    tokens, span = concept_tokens(embedder, PROMPT, 14, "Van Gogh")
    ids = tokens["input_ids"][0]
    assert pipe.tokenizer.decode(ids[span]).replace("\u2581", " ").split() == ["van", "gogh"]
    with torch.no_grad():
        read = run_encoder(embedder, tokens["input_ids"])
    torch.testing.assert_close(read, encode_full(embedder, [PROMPT]))
    before = {p: _sana_latents(pipe, p) for p in (PROMPT, UNRELATED)}
    trainer = ACETrainer(
        pipe, "Van Gogh", kind="style", steps=30, adversarial_every=10, adversarial_steps=2,
        mined_synonyms=0, queries_per_layer=16, batch_size=8, progress=False,
    )
    adapter = trainer.fit()
    assert adapter.fit["fine_tuning"]["adversaries_found"] > 0
    assert trainer.final_loss < trainer.initial_loss
    pipe.load_ace_adapter(adapter, adapter_name="vg")
    concept_change = (_sana_latents(pipe) - before[PROMPT]).abs().max()
    assert concept_change > (_sana_latents(pipe, UNRELATED) - before[UNRELATED]).abs().max()


@pytest.mark.parametrize("family", ["sd3", "pixart", "sana", "flux"])
def test_guards_and_model_offload_keep_the_erasure_on_transformers(family):
    pipe, kwargs = _family_pipeline(family), FAMILY_CALLS.get(family, {})

    def run():
        return _generate(pipe, PROMPT, **kwargs)

    pooled = {"sd3": 32, "flux": 16}.get(family)
    pipe.load_ace_adapter(random_adapter(pipe.transformer, rank=4, pooled_dim=pooled), adapter_name="r")
    erased = run()
    with pytest.raises(ACECompatibilityError, match="fuse_qkv_projections would replace the ACE processor"):
        pipe.transformer.fuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks around the transformer
    torch.testing.assert_close(run(), erased, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "pixart", "sana", "flux"])
def test_a_compiled_transformer_keeps_the_erasure_in_one_graph_across_scales(family):
    """``torch.compile(fullgraph=True)`` of each transformer family with an adapter loaded: outputs match
    eager at every scale, and rescaling (0 switches it off) reuses the one compiled graph."""
    pipe, kwargs = _family_pipeline(family), FAMILY_CALLS.get(family, {})
    model = pipe.transformer
    pooled = {"sd3": 32, "flux": 16}.get(family)
    name = pipe.load_ace_adapter(random_adapter(model, rank=4, seed=1, pooled_dim=pooled), adapter_name="a")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def outputs():
        results = []
        for scale in (1.0, 0.3, 0.0, 1.0):
            pipe.set_ace_adapters([name], scale)
            results.append(_generate(pipe, PROMPT, **{"num_inference_steps": 1, **kwargs}))
        return results

    eager = outputs()
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, fullgraph=True, backend=counting_backend)
    compiled = outputs()
    assert len(graphs) == 1
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=0)
    assert not torch.allclose(compiled[0], compiled[2]) and torch.equal(compiled[0], compiled[3])
    pipe.transformer = model
