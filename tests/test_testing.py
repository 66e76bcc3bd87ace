"""The offline model builders every test and benchmark relies on."""

import torch

from ace_diffusers.integration.modules import layer_shapes
from ace_diffusers.testing import (
    clip_tokenizer,
    random_adapter,
    sdxl_shaped_unet,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


def test_tiny_pipelines_generate_offline():
    for build in (tiny_sd_pipeline, tiny_sdxl_pipeline):
        pipe = build()
        out = pipe(
            "a cat",
            num_inference_steps=1,
            output_type="pt",
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
        )
        assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_the_clip_tokenizer_is_the_real_bpe_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a painting by Van Gogh")["input_ids"][0] == tokenizer.bos_token_id


def test_random_adapters_fit_the_unet_they_were_made_for():
    unet = tiny_sd_pipeline().unet
    adapter = random_adapter(unet, rank=3)
    adapter.check_compatible(layer_shapes(unet))
    assert adapter.rank == 3 and random_adapter(unet).state_dict().keys() == adapter.state_dict().keys()


def test_sdxl_shaped_unet_has_sdxl_cross_attention():
    with torch.device("meta"):
        unet = sdxl_shaped_unet()
    shapes = layer_shapes(unet)
    assert len(shapes) == 70 and {s[0] for s in shapes.values()} == {2048}


def test_the_clip_vocabulary_ships_with_the_package_and_its_licence():
    from pathlib import Path

    import ace_diffusers
    from ace_diffusers.testing import clip_tokenizer

    data = Path(ace_diffusers.__file__).parent / "data"
    assert (data / "clip_bpe_simple_vocab_16e6.txt.gz").is_file()
    assert "MIT License" in (data / "clip_bpe_simple_vocab_16e6.LICENSE.txt").read_text()
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer("a photo of a cat")["input_ids"][:2] == [49406, 320]
