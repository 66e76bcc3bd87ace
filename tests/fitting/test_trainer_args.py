import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.fitting.trainer_args import (
    MAX_DEFAULT_STEPS,
    default_steps,
    positive_float,
    positive_int,
    synonym_list,
    untrainable_reason,
)
from ace_diffusers.testing import tiny_sd_pipeline


def test_default_steps_grow_per_concept_up_to_the_cap():
    assert default_steps(1) == 450 and default_steps(2) == 500 and default_steps(10_000) == MAX_DEFAULT_STEPS


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_positive_int_names_the_argument(bad):
    with pytest.raises(ACEValueError, match="steps must be an integer >= 1"):
        positive_int(bad, "steps")


@pytest.mark.parametrize("bad", [0, -0.1, float("inf"), float("nan"), False, "1e-3"])
def test_positive_float_names_the_argument(bad):
    with pytest.raises(ACEValueError, match="learning_rate must be a positive number"):
        positive_float(bad, "learning_rate")


def test_synonyms_are_a_list_of_words_and_one_string_is_one_synonym():
    assert synonym_list("Vincent") == ["Vincent"] and synonym_list(None) == []
    with pytest.raises(ACEValueError, match="non-empty"):
        synonym_list(["ok", " "])
    with pytest.raises(ACEValueError, match="list of strings"):
        synonym_list(3)


def test_stable_diffusion_is_trainable_with_every_defence():
    assert untrainable_reason(tiny_sd_pipeline(), search_phrases=2, concept_vectors=2) is None
