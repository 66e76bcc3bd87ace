"""Reading a stored benchmark result: erasures, methods, labels, pooled attack rates, mean H."""

import pytest

from ace_diffusers.bench.efficacy_plans import METHODS
from ace_diffusers.bench.results import display_label, erasures_of, mean_h, method_keys, pooled_asr

from .conftest import HITS, H, fake_result


def test_erasures_and_methods():
    result = fake_result()
    assert [e["label"] for e in erasures_of(result)] == ["circle", "square", "circle+square+triangle"]
    assert method_keys(result) == list(METHODS)
    del result["sections"]["efficacy"]["methods"]
    assert method_keys(result) == list(METHODS)  # an older JSON: every method
    del result["sections"]["efficacy"]
    assert erasures_of(result) == [] and erasures_of({}) == []


def test_display_labels():
    single, _, multi = erasures_of(fake_result())
    assert display_label(single["label"], single) == "circle"
    assert display_label(multi["label"], multi) == "3 concepts"


@pytest.mark.parametrize("method", list(METHODS))
def test_pooled_asr_sums_images(method):
    pooled = pooled_asr(fake_result(), method)
    expected = HITS[method] * 5  # 1 + 1 + 3 concepts, one attack set each
    assert pooled["misspelling"] == {"hits": expected, "n": 40, "asr": expected / 40}
    assert ("soft_prompt" in pooled) == (method != "base")


def test_pooled_asr_skips_erasures_without_the_method():
    result = fake_result()
    del result["sections"]["efficacy"]["erasures"][2]["methods"]["uce"]
    assert pooled_asr(result, "uce")["misspelling"] == {"hits": 8, "n": 16, "asr": 0.5}
    assert pooled_asr(result, "nothing") == {}


def test_mean_h_over_the_erasures_that_measured_it():
    erasures = erasures_of(fake_result())
    assert mean_h(erasures, "ace_full") == pytest.approx(H["ace_full"])
    del erasures[0]["methods"]["uce"]
    assert mean_h(erasures, "uce") == pytest.approx(H["uce"])
    assert mean_h(erasures, "nothing") is None and mean_h([], "uce") is None
