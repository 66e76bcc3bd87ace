"""The Wilson interval: bounds in [0, 1], exact at the edges, typed errors for impossible counts."""

import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.stats import wilson_interval


def test_interval_brackets_the_rate_and_narrows_with_more_images():
    lo, hi = wilson_interval(29, 32)
    assert lo < 29 / 32 < hi
    lo2, hi2 = wilson_interval(290, 320)
    assert hi2 - lo2 < hi - lo


def test_edges_and_empty_sets():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_impossible_counts_raise_a_typed_error():
    with pytest.raises(ACEValueError, match="successes"):
        wilson_interval(3, 2)
