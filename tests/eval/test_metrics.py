import itertools
import math

import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval import metrics as M
from ace_diffusers.shapes.erasure import harmonic as shapes_harmonic


def test_harmonic_perfect_erasure_is_one():
    assert M.harmonic(0.0, 1.0, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "acc_e, acc_s, acc_g", [(1.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0)]
)
def test_harmonic_is_zero_when_any_term_is_zero(acc_e, acc_s, acc_g):
    assert M.harmonic(acc_e, acc_s, acc_g) == 0.0


def test_harmonic_known_values():
    assert M.harmonic(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert M.harmonic(0.1, 0.9, 0.2) == pytest.approx(3 / (1 / 0.9 + 1 / 0.9 + 1 / 0.8))
    # the harmonic mean never exceeds the smallest term by much: it is dominated by the worst one
    assert M.harmonic(0.0, 1.0, 0.9) == pytest.approx(3 / (1 + 1 + 10))


def test_harmonic_matches_the_miniature_world_helper():
    grid = [0.0, 0.125, 0.5, 0.875, 1.0]
    for acc_e, acc_s, acc_g in itertools.product(grid, repeat=3):
        assert M.harmonic(acc_e, acc_s, acc_g) == shapes_harmonic(acc_e, acc_s, acc_g)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_harmonic_rejects_non_fractions(bad):
    with pytest.raises(ACEValueError):
        M.harmonic(bad, 0.5, 0.5)


def test_accuracy_and_recognition_rate():
    assert M.accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    assert M.accuracy(["a", "a"], "a") == 1.0
    assert M.accuracy(["b"], "a") == 0.0
    assert M.recognition_rate(["x", "y", "z", "x"], {"x", "y"}) == 0.75
    with pytest.raises(ACEValueError):
        M.accuracy([], "a")
    with pytest.raises(ACEValueError):
        M.accuracy(["a"], ["a", "b"])
    with pytest.raises(ACEValueError):
        M.recognition_rate(["a"], [])


def test_attack_success_rate_edges():
    assert M.attack_success_rate(["circle"] * 4, "circle") == 1.0
    assert M.attack_success_rate(["square"] * 4, "circle") == 0.0
    assert M.attack_success_rate(["circle", "square", "star", "circle"], "circle") == 0.5
    assert M.attack_success_rate(["circle", "star"], ["circle", "star"]) == 1.0  # multi-concept erasure
    with pytest.raises(ACEValueError):
        M.attack_success_rate([], "circle")


def test_erasure_metrics_from_labels():
    out = M.erasure_metrics(
        erased=["circle", "shape", "shape", "shape"],
        synonyms=["shape", "shape"],
        others=["square", "star", "star"],
        concept="circle",
        other_labels=["square", "star", "heart"],
    )
    assert out["acc_e"] == 0.25 and out["acc_g"] == 0.0 and out["acc_s"] == pytest.approx(2 / 3)
    assert out["h"] == pytest.approx(M.harmonic(0.25, 2 / 3, 0.0))


def test_wilson_interval():
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = M.wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = M.wilson_interval(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.8
    lo, hi = M.wilson_interval(5, 10)
    assert lo < 0.5 < hi and math.isclose(lo + hi, 1.0)
    with pytest.raises(ACEValueError):
        M.wilson_interval(3, 2)
