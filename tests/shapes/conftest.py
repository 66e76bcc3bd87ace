"""Fixtures for the miniature-world tests (bundled weights; skipped only if they are absent)."""

from __future__ import annotations

import pytest

from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

NEEDS_WEIGHTS = pytest.mark.skipif(
    not weights_present(),
    reason=f"miniature-world weights absent from {WEIGHTS_DIR} (train: ace-diffusers shapes train)",
)
NEEDS_CLASSIFIER = pytest.mark.skipif(
    not (WEIGHTS_DIR / "classifier.safetensors").exists(),
    reason=f"miniature-world classifier weights absent from {WEIGHTS_DIR}",
)


@pytest.fixture(scope="session")
def shapes_pipe():
    if not weights_present():
        pytest.skip(f"miniature-world weights absent from {WEIGHTS_DIR}")
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    return load_shapes_pipeline()


@pytest.fixture(scope="session")
def shapes_classifier():
    if not (WEIGHTS_DIR / "classifier.safetensors").exists():
        pytest.skip(f"miniature-world classifier weights absent from {WEIGHTS_DIR}")
    from ace_diffusers.shapes.classifier import load_shapes_classifier

    return load_shapes_classifier()
