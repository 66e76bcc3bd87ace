"""The tiny transformer-based pipelines run, deterministically, and the T5 tokenizer behaves like T5's."""

import torch

from ace_diffusers.testing_transformers import (
    t5_tokenizer,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
)


def test_the_t5_tokenizer_keeps_known_words_whole_and_spells_the_rest():
    tokenizer = t5_tokenizer()
    ids = tokenizer("A painting by Van Gogh, zebra!")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:5] == ["\u2581a", "\u2581painting", "\u2581by", "\u2581van", "\u2581gogh"]
    assert pieces[-1] == "</s>" and ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert "<unk>" not in pieces  # any word is spelled from letter pieces


def test_the_tiny_pipelines_generate_the_same_images_twice():
    for pipe, kwargs in (
        (tiny_pixart_pipeline(), {"clean_caption": False, "use_resolution_binning": False}),
        (tiny_sd3_pipeline(t5=True), {}),
        (tiny_flux_pipeline(), {"max_sequence_length": 32}),
        (tiny_flux_pipeline(guidance=True), {"max_sequence_length": 32}),
    ):
        images = [
            pipe(
                "a red house",
                num_inference_steps=2,
                height=32,
                width=32,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
                **kwargs,
            ).images
            for _ in range(2)
        ]
        assert images[0].shape == (1, 3, 32, 32) and torch.equal(images[0], images[1])
