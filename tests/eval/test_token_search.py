"""The coordinate search over real words that both token attacks use: whole-word tokens that round-trip,
never the concept's own, and a kept loss that never rises when each step sees the whole objective."""

import torch

from ace_diffusers.eval.concept_vector import EmbeddingObjective
from ace_diffusers.eval.soft_prompt import token_span
from ace_diffusers.eval.token_search import TokenSearch, decoded_words, retokenises_as, word_tokens

from .conftest import encode


def test_word_tokens_round_trip(sd_pipe):
    mask = word_tokens(sd_pipe.tokenizer)
    ids = mask.nonzero().squeeze(1)[:50].tolist()
    assert len(ids) == 50
    for i in ids:
        text = sd_pipe.tokenizer.decode([i]).strip()
        assert sd_pipe.tokenizer(text, add_special_tokens=False)["input_ids"] == [i]


def test_search_lowers_a_whole_objective_loss_with_words_never_the_concept(sd_pipe):
    text = "a photo of x x"
    span = token_span(sd_pipe, text, (11, 14))
    target = encode(sd_pipe, "a photo of red dog")
    objective = EmbeddingObjective(sd_pipe, text, target)
    search = TokenSearch(sd_pipe, span, objective, concept="dog", top_k=8, candidates=6, seed=0)
    result = search.run(5)
    assert len(result.token_ids) == 2 and len(result.losses) == 5
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:], strict=False))
    assert result.final_loss <= result.initial_loss
    dog = set(sd_pipe.tokenizer("dog", add_special_tokens=False)["input_ids"])
    assert not dog & set(result.token_ids.tolist())
    words = decoded_words(sd_pipe.tokenizer, result.token_ids)
    assert retokenises_as(sd_pipe.tokenizer, "a photo of " + " ".join(words), span, result.token_ids)
    assert torch.equal(encode(sd_pipe, text), encode(sd_pipe, "a photo of x x"))  # no hook left behind
