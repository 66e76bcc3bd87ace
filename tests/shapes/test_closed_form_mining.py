"""The closed form erases what the model reads like the concept, not only the word it was given: on the
miniature world, a word it mined from the model (never given, never from the world's vocabulary) stops
drawing the shape."""

from ace_diffusers import erase_concept
from ace_diffusers.shapes.erasure import erase_arguments
from ace_diffusers.shapes.pipeline import generate
from ace_diffusers.shapes.vocab import COLOURS

from .conftest import NEEDS_CLASSIFIER, NEEDS_WEIGHTS


def _drawn_as(pipe, classifier, word, shape, colours):
    images = generate(pipe, [f"a {c} {word}" for c in colours], seeds=list(range(len(colours))))
    return sum(s == shape for s in classifier.predict(images)["shape"]) / len(colours)


@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_the_closed_form_erases_a_mined_word_it_was_never_given(shapes_pipe, shapes_classifier):
    colours = COLOURS[:4]
    adapter = erase_concept(shapes_pipe, **erase_arguments("circle"), load=False)
    mined = adapter.fit["mined_neighbours"]["circle"]
    assert mined and "circle" not in mined
    # a mined word the base model draws as a circle (so erasing it is visible)
    drawn = {w: _drawn_as(shapes_pipe, shapes_classifier, w, "circle", colours) for w in mined[:4]}
    word = max(drawn, key=drawn.get)
    assert drawn[word] >= 0.75, drawn
    name = shapes_pipe.load_ace_adapter(adapter)
    try:
        assert _drawn_as(shapes_pipe, shapes_classifier, word, "circle", colours) <= 0.25, word
        assert _drawn_as(shapes_pipe, shapes_classifier, "square", "square", colours) >= 0.75
    finally:
        shapes_pipe.unload_ace_adapter(name)


@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_with_the_dictionary_the_closed_form_erases_a_split_word(shapes_pipe, shapes_classifier, monkeypatch):
    """``FitSettings(dictionary=True)``: English words the tokenizer splits are mined too (here the 5,000
    most frequent plus "rhombus", three WordPiece pieces; the real list is 100,000). The world draws a
    rhombus as a diamond; erasing "diamond" then erases "rhombus", which the fit was never given."""
    from ace_diffusers.fitting import vocabulary
    from ace_diffusers.fitting.data import FitSettings

    words = vocabulary.english_words(5000) + ("rhombus",)
    monkeypatch.setattr(vocabulary, "english_words", lambda count=None: words)
    colours = COLOURS[:4]
    assert _drawn_as(shapes_pipe, shapes_classifier, "rhombus", "diamond", colours) >= 0.75
    plain = erase_concept(shapes_pipe, **erase_arguments("diamond"), load=False)
    assert "rhombus" not in plain.fit["mined_neighbours"]["diamond"]
    settings = FitSettings(dictionary=True)
    adapter = erase_concept(shapes_pipe, **erase_arguments("diamond"), settings=settings, load=False)
    assert "rhombus" in adapter.fit["mined_neighbours"]["diamond"]
    name = shapes_pipe.load_ace_adapter(adapter)
    try:
        assert _drawn_as(shapes_pipe, shapes_classifier, "rhombus", "diamond", colours) <= 0.25
        assert _drawn_as(shapes_pipe, shapes_classifier, "square", "square", colours) >= 0.75
    finally:
        shapes_pipe.unload_ace_adapter(name)
