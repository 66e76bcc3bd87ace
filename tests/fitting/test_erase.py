"""``erase_concept``: one call fits (closed form, or closed form + fine-tuning) and loads the adapter."""

import pytest

from ace_diffusers import ACEValueError, erase_concept
from ace_diffusers.fitting.data import FitSettings


def test_method_ace_fine_tunes_and_loads_the_result(sd_pipe):
    adapter = erase_concept(
        sd_pipe, "Van Gogh", kind="style", method="ace", fine_tuning={"steps": 3, "seed": 1}, progress=False
    )
    assert adapter.method == "ace" and adapter.fit["fine_tuning"]["steps_run"] == 3
    assert adapter.fit["fine_tuning"]["seed"] == 1
    assert sd_pipe.get_list_ace_adapters() == ["van_gogh"]


def test_the_closed_form_is_the_default(sd_pipe):
    adapter = erase_concept(sd_pipe, "Van Gogh", kind="style", load=False)
    assert adapter.method == "closed-form" and sd_pipe.get_list_ace_adapters() == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="esd"), "method must be one of"),
        (dict(method="ace", settings=FitSettings()), "configure the closed form only"),
        (dict(method="ace", preserve_weight=1.0), "configure the closed form only"),
        (dict(method="ace", fine_tuning=["steps", 3]), "fine_tuning must be a dict"),
        (dict(fine_tuning={"steps": 3}), "applies to method='ace' only"),
    ],
)
def test_options_the_method_does_not_read_are_refused_before_any_work(sd_pipe, monkeypatch, kwargs, message):
    from ace_diffusers.fitting import erase

    monkeypatch.setattr(erase, "fit_adapter", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(erase, "ACETrainer", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ACEValueError, match=message):
        erase_concept(sd_pipe, "Van Gogh", kind="style", **kwargs)
