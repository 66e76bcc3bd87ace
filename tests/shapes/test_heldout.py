"""The held-out split: candidate words are never in a training caption."""

import numpy as np

from ace_diffusers.shapes import heldout as H
from ace_diffusers.shapes import vocab as V
from ace_diffusers.shapes.render import render_dataset


def test_training_words_cover_every_caption():
    words = H.training_words()
    data = render_dataset(300, seed=3, captions=2)
    caption_words = {
        w for caps in data["captions"] for c in caps for w in c.replace(",", " ").replace("-", " ").split()
    }
    assert caption_words <= words


class _Tokenizer:
    def get_vocab(self):
        return {"ball": 0, "circle": 1, "##ing": 2, "an": 3, "cube": 4, "disc": 5, "12": 6}


def test_candidates_leave_out_trained_words_and_word_pieces():
    assert H.candidate_words(_Tokenizer()) == ["ball", "cube"]


def test_the_recorded_split_names_only_unseen_words():
    split = H.heldout_words()
    assert set(split) == set(V.SHAPES)
    seen = H.training_words()
    assert not any(w in seen for words in split.values() for w in words)
    assert all(isinstance(w, str) for words in split.values() for w in words)
    assert np.all([len(set(words)) == len(words) for words in split.values()])
