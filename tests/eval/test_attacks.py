import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval import attacks, common, soft_prompt
from ace_diffusers.eval.attacks import misspellings, prompt_attacks, weighted_variants


def test_misspellings_are_deterministic_distinct_edits():
    out = misspellings("circle")
    assert out == misspellings("circle")
    assert out == ["cicrle", "cirle", "cirrcle", "cyrcle", "cir cle"]
    assert len(set(out)) == len(out) and "circle" not in out
    assert misspellings("circle", 2) == out[:2]
    multi = misspellings("Van Gogh")
    assert all(m.startswith("Van ") or m.startswith("Va") for m in multi) and "Van Gogh" not in multi
    assert misspellings("ab") == ["abb", "aab"]
    with pytest.raises(ACEValueError):
        misspellings("  ")


def test_weighted_variants():
    assert weighted_variants("star") == ["(star:1.5)", "((star))", "star star star"]
    assert weighted_variants("Van Gogh") == ["(Van Gogh:1.5)", "((Van Gogh))", "Van Gogh Van Gogh Van Gogh"]


def test_prompt_attacks_one_variant_per_base_prompt():
    base = ["a red circle", "a blue circle", "a green circle"]
    out = prompt_attacks(base, "circle", neutral="shape", others=["square", "star", "circle"])
    assert set(out) == {"misspelling", "weighting", "context", "negative"}
    assert all(len(v) == 3 for v in out.values())
    assert [a.prompt for a in out["misspelling"]] == ["a red cicrle", "a blue cirle", "a green cirrcle"]
    assert (
        out["weighting"][0].prompt == "a red (circle:1.5)"
        and out["weighting"][2].prompt == "a green circle circle circle"
    )
    assert all("circle" in a.prompt and ("square" in a.prompt or "star" in a.prompt) for a in out["context"])
    assert out["negative"][0].negative_prompt == "shape" and out["negative"][0].prompt == "a red circle"
    assert out["negative"][1].negative_prompt == "square, star"  # the concept itself is never an "other"
    assert all(a.base_prompt in base for v in out.values() for a in v)
    assert set(prompt_attacks(base, "circle", attacks=["misspelling"])) == {"misspelling"}
    with pytest.raises(ACEValueError):
        prompt_attacks(base, "circle", attacks=["telepathy"])
    with pytest.raises(ACEValueError):
        prompt_attacks(["a red square"], "circle")


def test_prompt_attacks_without_others_or_anchor():
    base = ["a red circle", "a blue circle"]
    out = prompt_attacks(base, "circle", attacks=["context", "negative"])
    assert [a.prompt for a in out["context"]] == [
        f"{b}, in a detailed picture with many other things" for b in base
    ]
    assert [a.negative_prompt for a in out["negative"]] == ["blurry, low quality"] * 2


def test_names_that_moved_are_still_importable_from_here():
    # the soft-prompt attack and the prompt helpers have their own modules now
    assert attacks.soft_prompt_attack is soft_prompt.soft_prompt_attack
    assert attacks.SoftPromptSettings is soft_prompt.SoftPromptSettings
    assert attacks.replace_concept is common.replace_concept
    optimised = ("soft_prompt", "discrete_tokens", "concept_vector")
    assert attacks.ALL_ATTACKS == attacks.PROMPT_ATTACKS + optimised
