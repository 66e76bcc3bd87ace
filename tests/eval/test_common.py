"""The evaluation suite's shared pieces: model states, the concept in a prompt, seeded latents, processes."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from ace_diffusers.errors import ACECompatibilityError, ACEValueError
from ace_diffusers.eval.common import (
    ace_disabled,
    as_context,
    check_sd_pipeline,
    concept_char_span,
    distributed_map,
    latent_shape,
    partial_state,
    replace_concept,
    seeded_latents,
)
from ace_diffusers.testing import random_adapter


def test_ace_disabled_restores_the_previous_state(sd_pipe):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), "a")
    sd_pipe.disable_ace_adapters()
    with ace_disabled(sd_pipe):
        assert sd_pipe.get_active_ace_adapters() == []
    assert sd_pipe.get_active_ace_adapters() == []  # it was off before: stays off
    sd_pipe.enable_ace_adapters()
    with ace_disabled(sd_pipe):
        assert sd_pipe.get_active_ace_adapters() == []
    assert sd_pipe.get_active_ace_adapters() == ["a"]


def test_ace_disabled_restores_the_state_after_an_error(sd_pipe):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), "a")
    with pytest.raises(RuntimeError), ace_disabled(sd_pipe):
        raise RuntimeError("inside")
    assert sd_pipe.get_active_ace_adapters() == ["a"]


def test_ace_disabled_refuses_fused_adapters(sd_pipe):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), "a")
    sd_pipe.fuse_ace_adapter("a")
    with pytest.raises(ACECompatibilityError, match="unfuse_ace_adapter"):
        with ace_disabled(sd_pipe):
            pass


def test_as_context_prefers_the_given_factory(sd_pipe):
    @contextlib.contextmanager
    def original():
        yield "mine"

    assert as_context(original, sd_pipe) is original
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), "a")
    with as_context(None, sd_pipe)():  # default: ACE adapters switched off
        assert sd_pipe.get_active_ace_adapters() == []
    assert sd_pipe.get_active_ace_adapters() == ["a"]


def test_the_concept_is_found_as_a_whole_word_case_insensitively():
    assert replace_concept("a red Circle, dotted", "circle", "X") == "a red X, dotted"
    assert replace_concept("circles and a circle", "circle", "X") == "circles and a X"  # whole words only
    assert replace_concept("a circle and a circle", "circle", "X") == "a X and a circle"  # the first one
    assert replace_concept("a van gogh painting", "Van Gogh", r"\1") == r"a \1 painting"  # taken literally
    assert concept_char_span("a red circle", "circle") == (6, 12)
    assert concept_char_span("a circle-shaped circle", "circle") == (
        16,
        22,
    )  # hyphenated words are other words
    for call in (replace_concept, concept_char_span):
        with pytest.raises(ACEValueError, match="does not contain"):
            call("a red square", "circle", *(["X"] if call is replace_concept else []))


def test_latent_shape_and_seeded_latents(sd_pipe):
    channels, lh, lw, height, width = latent_shape(sd_pipe, None, None)
    factor = 2 ** (len(sd_pipe.vae.config.block_out_channels) - 1)
    assert (channels, lh * factor, lw * factor) == (sd_pipe.unet.config.in_channels, height, width)
    assert latent_shape(sd_pipe, 16, 24)[1:] == (16 // factor, 24 // factor, 16, 24)
    batch = seeded_latents(sd_pipe, [3, 4], 16, 16)
    assert batch.shape == (2, channels, 16 // factor, 16 // factor)
    # one generator per seed: an image's latents do not depend on the rest of the batch
    assert torch.equal(seeded_latents(sd_pipe, [4], 16, 16)[0], batch[1])
    assert not torch.equal(batch[0], batch[1])
    expected = torch.randn((channels, lh, lw), generator=torch.Generator().manual_seed(7))
    assert torch.equal(
        seeded_latents(sd_pipe, [7], None, None)[0], expected * sd_pipe.scheduler.init_noise_sigma
    )


def test_check_sd_pipeline(sd_pipe, sdxl_pipe):
    check_sd_pipeline(sd_pipe, "The test")
    with pytest.raises(ACECompatibilityError, match="two text encoders"):
        check_sd_pipeline(sdxl_pipe, "The test")
    pipe = SimpleNamespace(unet=object(), text_encoder=object(), tokenizer=None, scheduler=object())
    with pytest.raises(ACECompatibilityError, match=r"The test needs pipe\.tokenizer"):
        check_sd_pipeline(pipe, "The test")


class _OneProcess:
    num_processes = 1


def test_distributed_map_keeps_the_order_without_a_group():
    assert distributed_map(lambda x: x * x, range(5)) == [0, 1, 4, 9, 16]
    assert distributed_map(str, (3, 1, 2), _OneProcess()) == ["3", "1", "2"]
    assert distributed_map(str, []) == []


def test_partial_state_outside_a_launch_is_one_process():
    state = partial_state()
    assert state.num_processes == 1 and state.is_main_process
    assert distributed_map(lambda x: -x, [1, 2], state) == [-1, -2]
