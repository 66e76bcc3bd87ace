"""The benchmark page's plots: one PNG per measured section, drawn from the stored numbers alone."""

import io

import pytest
from PIL import Image

from ace_diffusers.bench import plots

from .conftest import fake_result


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.parametrize("plot", [plots.plot_h, plots.plot_asr, plots.plot_fit_seconds, plots.plot_overhead])
def test_each_plot_is_a_png(plot):
    width, height = _size(plot(fake_result()))
    assert width >= 500 and height >= 300


def test_plots_follow_the_sections_present():
    result = fake_result()
    assert set(plots.plots(result)) == set(plots.PLOTS.values())
    del result["sections"]["inference"]
    assert set(plots.plots(result)) == {plots.PLOTS[k] for k in ("h", "asr", "fit_seconds")}
    del result["sections"]["efficacy"]
    assert plots.plots(result) == {}


def test_plots_are_reproducible_and_follow_the_numbers():
    result = fake_result()
    assert plots.plot_h(result) == plots.plot_h(fake_result())
    result["sections"]["efficacy"]["erasures"][0]["methods"]["ace_full"]["metrics"]["h"] = 0.1
    assert plots.plot_h(result) != plots.plot_h(fake_result())


def test_h_plot_grows_with_the_erasures():
    result = fake_result()
    erasures = result["sections"]["efficacy"]["erasures"]
    wide = _size(plots.plot_h(result))[0]
    del erasures[1:]
    assert _size(plots.plot_h(result))[0] < wide
