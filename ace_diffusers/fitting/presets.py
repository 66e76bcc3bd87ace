"""Concept kinds and what erasing one means: templates, neutral anchor, preservation set.

The data lives in ``ace_diffusers/data/presets.json`` so it can be read, reviewed and overridden
without touching code; :func:`resolve_spec` turns a user's arguments into a validated
:class:`ErasureSpec`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ACEValueError

MAX_CONCEPT_CHARS = 500


@functools.lru_cache(maxsize=1)
def load_presets() -> dict[str, Any]:
    return json.loads(
        resources.files("ace_diffusers").joinpath("data/presets.json").read_text(encoding="utf-8")
    )


def available_kinds() -> list[str]:
    return sorted(load_presets()["kinds"])


@dataclass
class ErasureSpec:
    """Everything the fitter needs to know about *what* to erase (not *how*)."""

    concepts: list[str]
    neutral: list[str]  # one anchor per concept
    kind: str
    templates: list[str]
    preserve: list[str]
    negatives: list[str] = field(default_factory=list)  # generic prompts whose tokens the gate must ignore
    phrase_templates: dict[str, list[str]] = field(default_factory=dict)  # per-phrase overrides
    expanded: list[str] = field(
        default_factory=list
    )  # concepts the kind adds to every fit (explicit's terms)
    pairing: list[str] = field(default_factory=list)  # what paired prompts pair a concept with (.data)

    def templates_for(self, phrase: str) -> list[str]:
        """Templates for one concept or preserved phrase (per-phrase override, else the shared list).

        A concept's templates that name *another* erased concept are left out (unless that leaves none):
        "a {} blue square" while erasing both striped and square would pair "a striped blue square" with
        the target "a plain blue square" and teach the adapter to keep the square.
        """
        templates = self.phrase_templates.get(phrase, self.templates)
        if len(self.concepts) > 1 and phrase in self.concepts:
            usable = [t for t in templates if not self.names_concept(filled(t, " "), besides=phrase)]
            return usable or templates
        return templates

    def names_concept(self, text: str, besides: str | None = None) -> bool:
        """Whether ``text`` names one of the erased concepts (whole words, any case), ``besides`` aside."""
        found = {m.group(0).lower() for m in self._concept_pattern.finditer(text)}
        return bool(found - {besides.lower()} if besides else found)

    @functools.cached_property
    def _concept_pattern(self) -> re.Pattern:
        # one alternation for all concepts (longest first): thousands of concepts stay one regex scan
        phrases = sorted({c for c in self.concepts if c}, key=len, reverse=True)
        alternatives = "|".join(re.escape(p) for p in phrases) or r"(?!x)x"
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", flags=re.IGNORECASE)

    def preserve_prompts(self, templates_per_phrase: int | None = None) -> list[str]:
        """Each preserved phrase in its first ``templates_per_phrase`` templates, leaving out prompts that
        name a concept being erased (e.g. a fill-style template "a {} red circle" while "circle" is
        erased): keeping those unchanged would fight the erasure."""
        return [prompt for prompt, _ in self.preserve_prompt_spans(templates_per_phrase)]

    def preserve_prompt_spans(
        self, templates_per_phrase: int | None = None
    ) -> list[tuple[str, tuple[int, int]]]:
        """:meth:`preserve_prompts` with each phrase's character span (lets the encoder share template "
        "prefixes)."""
        out = []
        for phrase in self.preserve:
            for template in self.templates_for(phrase)[:templates_per_phrase]:
                prompt, span = fill_template(template, phrase)
                if not self.names_concept(prompt):
                    out.append((prompt, span))
        return out

    def unrelated_prompts(self) -> list[str]:
        """The generic prompts whose tokens the gate must ignore, minus any that name an erased concept."""
        return [p for p in self.negatives if not self.names_concept(p)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "concepts": self.concepts,
            "neutral": self.neutral,
            "kind": self.kind,
            "templates": self.templates,
            **({"phrase_templates": self.phrase_templates} if self.phrase_templates else {}),
            "preserve": self.preserve,
        }


def fill_template(template: str, phrase: str) -> tuple[str, tuple[int, int]]:
    """``template`` with ``phrase`` in its ``{}``, and the phrase's character span in the prompt.

    The one template filler of the package (templates hold ``{}`` exactly once: :func:`resolve_spec`).
    """
    start = template.index("{}")
    return template[:start] + phrase + template[start + 2 :], (start, start + len(phrase))


def fill_phrase(template: str, phrase: str) -> tuple[str, tuple[int, int] | None]:
    """:func:`fill_template`, except that an empty phrase (the empty anchor) marks no span and leaves no
    double space: ``"a {} circle"`` with ``""`` is ``"a circle"``."""
    prompt, span = fill_template(template, phrase)
    return (prompt, span) if phrase else (normalize_prompt(prompt), None)


def filled(template: str, phrase: str) -> str:
    """The prompt of :func:`fill_template` alone."""
    return fill_template(template, phrase)[0]


def normalize_prompt(text: str) -> str:
    """Single spaces, no leading or trailing white space (``"a  blue square "`` -> ``"a blue square"``)."""
    return " ".join(text.split())


def _clean_phrase(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ACEValueError(f"Each {what} must be a string, got {type(value).__name__} ({value!r}).")
    phrase = " ".join(value.split())
    if not phrase:
        raise ACEValueError(f"Empty {what}: {value!r}. Give the words that name it, e.g. 'Van Gogh'.")
    if len(phrase) > MAX_CONCEPT_CHARS:
        raise ACEValueError(f"A {what} of {len(phrase)} characters is too long (limit {MAX_CONCEPT_CHARS}).")
    return phrase


def _as_list(value: str | list[str] | tuple[str, ...] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [_clean_phrase(value, what)]
    if not isinstance(value, (list, tuple)):
        raise ACEValueError(f"{what}s must be a string or a list of strings, got {type(value).__name__}.")
    return [_clean_phrase(v, what) for v in value]


def resolve_spec(
    concepts: str | list[str],
    *,
    neutral: str | list[str] | None = None,
    kind: str | None = None,
    preserve: str | list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
) -> ErasureSpec:
    """Validate the arguments of ``erase_concept`` and fill in the kind's presets."""
    presets = load_presets()
    kind_name = kind if kind is not None else "custom"
    if kind_name not in presets["kinds"]:
        raise ACEValueError(
            f"Unknown concept kind {kind!r}; choose one of {available_kinds()} or leave it None."
        )
    preset = presets["kinds"][kind_name]

    concept_list = _as_list(concepts, "concept") or []
    if not concept_list:
        raise ACEValueError("No concept given: pass a string such as 'Van Gogh' or a list of strings.")
    expanded = [t for t in preset.get("expand", []) if t.lower() not in {c.lower() for c in concept_list}]
    concept_list += expanded
    concept_list = list(dict.fromkeys(concept_list))  # drop duplicates, keep order

    neutral_list = _neutral_list(neutral, concept_list, preset["neutral"])
    template_list, phrase_templates = _template_lists(templates, concept_list[0], preset["templates"])

    lowered = {c.lower() for c in concept_list}
    preserve_list = _as_list(preserve, "preserved concept")
    named = [p for p in preserve_list or [] if p.lower() in lowered]
    if named:
        raise ACEValueError(
            f"preserve names a concept being erased ({named[0]!r}): keeping it unchanged would fight the "
            "erasure; remove it from preserve."
        )
    # paired prompts use the kind's list as it stands (the same prompts in every fit of the kind, so
    # they are prepared ahead); entries naming a concept are left out there, not replaced
    pairing = list(preserve_list) if preserve_list is not None else list(preset["preserve"])
    if preserve_list is None:  # the kind's defaults may name the concept: those entries are left out
        preserve_list = [p for p in preset["preserve"] if p.lower() not in lowered]

    return ErasureSpec(
        concepts=concept_list,
        neutral=neutral_list,
        kind=kind_name,
        templates=template_list,
        preserve=preserve_list,
        negatives=list(presets["generic_negatives"]),
        phrase_templates=phrase_templates,
        expanded=expanded,
        pairing=pairing,
    )


def _neutral_list(neutral: str | list[str] | None, concepts: list[str], default: str) -> list[str]:
    """One anchor per concept: the kind's default, one for all, or one each; never the concept itself."""
    if isinstance(neutral, (list, tuple)):  # an empty anchor ("" = no particular thing) is allowed
        neutral_list = [
            "" if isinstance(v, str) and not v.strip() else _clean_phrase(v, "neutral anchor")
            for v in neutral
        ]
    else:
        neutral_list = _as_list(neutral, "neutral anchor") if neutral not in ("", None) else None
    if neutral_list is None:
        neutral_list = [neutral if neutral == "" else default] * len(concepts)
    elif len(neutral_list) == 1:
        neutral_list = neutral_list * len(concepts)
    elif len(neutral_list) != len(concepts):
        raise ACEValueError(
            f"Got {len(concepts)} concepts but {len(neutral_list)} neutral anchors; pass one anchor for all "
            "or one per concept."
        )
    for concept, anchor in zip(concepts, neutral_list, strict=True):
        if concept.lower() == anchor.lower():
            raise ACEValueError(
                f"The concept {concept!r} equals its neutral anchor; the anchor must be what the concept "
                f"should "
                "turn into (e.g. 'art' for a style, 'a person' for a celebrity)."
            )
    return neutral_list


def _template_lists(
    templates: list[str] | dict[str, list[str]] | None, first_concept: str, default: list[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """``(shared templates, per-phrase templates)``, each holding ``{}`` exactly once."""
    phrase_templates: dict[str, list[str]] = {}
    if isinstance(templates, dict):  # per-phrase templates, e.g. when concepts of several kinds mix
        phrase_templates = {str(k): list(v) for k, v in templates.items()}
        template_list = phrase_templates.get(first_concept) or list(default)
    else:
        template_list = list(templates) if templates is not None else list(default)
    for template in template_list + [t for ts in phrase_templates.values() for t in ts]:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ACEValueError(f"Template {template!r} must be a string containing '{{}}' exactly once.")
    if not template_list:
        raise ACEValueError("At least one prompt template is needed.")
    return template_list, phrase_templates
