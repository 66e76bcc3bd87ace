"""What erasing means per kind: templates, anchors, preservation sets and the one template filler."""

import pytest


def test_preservation_and_unrelated_prompts_never_name_an_erased_concept():
    from ace_diffusers.fitting.presets import resolve_spec

    spec = resolve_spec(
        ["circle", "striped"],
        neutral=["", "plain"],
        preserve=["solid", "heart"],
        templates={
            "solid": ["a {} red circle", "a {} blue heart"],
            "heart": ["a {}", "a striped {}"],
            "circle": ["a {}"],
        },
    )
    assert spec.preserve_prompts() == ["a solid blue heart", "a heart"]
    assert spec.preserve_prompts(1) == ["a heart"]  # "a solid red circle" would fight the erasure
    coffee = resolve_spec("coffee")
    assert "a cup of coffee" in coffee.negatives and "a cup of coffee" not in coffee.unrelated_prompts()
    assert spec.names_concept("a Circle.") and not spec.names_concept("a semicircle")
    assert not spec.names_concept("a red circle", besides="circle") and spec.names_concept(
        "striped circle", besides="circle"
    )


def test_a_concepts_templates_naming_another_erased_concept_are_left_out():
    from ace_diffusers.fitting.presets import resolve_spec

    styles = ["a {} red circle", "a {} blue square", "a {} green heart"]
    spec = resolve_spec(
        ["striped", "square"], neutral=["plain", ""], templates={"striped": styles, "square": ["a {}"]}
    )
    assert spec.templates_for("striped") == ["a {} red circle", "a {} green heart"]
    assert resolve_spec("striped", templates={"striped": styles}).templates_for("striped") == styles


def test_the_one_template_filler():
    from ace_diffusers.fitting.presets import fill_phrase, fill_template, filled, normalize_prompt

    assert fill_template("a painting by {}", "Van Gogh") == ("a painting by Van Gogh", (14, 22))
    assert filled("{} and {}", "x") == "x and {}"  # only the first slot: templates hold exactly one
    assert fill_phrase("a {} circle", "") == ("a circle", None)  # the empty anchor leaves no double space
    assert fill_phrase("a {} circle", "red") == ("a red circle", (2, 5))
    assert normalize_prompt("  a  blue square ") == "a blue square"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"concepts": ""}, "Empty concept"),
        ({"concepts": [], "kind": None}, "No concept given"),
        ({"concepts": "x", "kind": "painting"}, "Unknown concept kind"),
        ({"concepts": "art", "kind": "style"}, "equals its neutral anchor"),
        ({"concepts": ["a", "b", "c"], "neutral": ["x", "y"]}, "one anchor for all"),
        ({"concepts": "x", "templates": ["no slot"]}, "exactly once"),
        ({"concepts": "x", "templates": []}, "At least one prompt template"),
        ({"concepts": "cat", "preserve": ["dog", "Cat"]}, "preserve names a concept being erased"),
    ],
)
def test_bad_specs_say_what_to_change(kwargs, message):
    from ace_diffusers.errors import ACEValueError
    from ace_diffusers.fitting.presets import resolve_spec

    with pytest.raises(ACEValueError, match=message):
        resolve_spec(**kwargs)


def test_every_kind_has_templates_an_anchor_and_a_preservation_set():
    from ace_diffusers.fitting.presets import available_kinds, load_presets

    kinds = load_presets()["kinds"]
    assert {"object", "style", "celebrity", "explicit", "custom"} <= set(available_kinds())
    for name, preset in kinds.items():
        assert preset["templates"] and all(t.count("{}") == 1 for t in preset["templates"]), name
        assert isinstance(preset["neutral"], str) and isinstance(preset["preserve"], list), name


def test_a_kinds_default_preserve_list_leaves_the_concept_out():
    from ace_diffusers.fitting.presets import resolve_spec

    spec = resolve_spec("cat", kind="object")
    assert spec.preserve and "cat" not in spec.preserve
