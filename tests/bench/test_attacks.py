"""``ace-diffusers bench attacks``: each method's state is undone after use, rates carry their
intervals, and a saved run re-renders the page and its plot without generating anything."""

import json

import pytest
import torch

from ace_diffusers.bench import attacks
from ace_diffusers.eval.plans import EvalCase
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

from .test_attacks_report import result


def test_rates_count_hits_per_group_with_an_interval():
    cases = [EvalCase("a", "p", i, {"shape": "circle"}) for i in range(4)] + [
        EvalCase("b", "p", 0, {"shape": "circle"})
    ]
    rates = attacks._rates(cases, ["circle", "square", "circle", "none", "square"], "circle")
    assert rates["a"]["hits"] == 2 and rates["a"]["asr"] == 0.5 and rates["b"]["asr"] == 0.0
    low, high = rates["a"]["interval"]
    assert 0 < low < 0.5 < high < 1


def test_repeat_spreads_images_over_prompts_with_distinct_seeds():
    cases = attacks._repeat("g", [("p1", None, None), (None, "neg", "key")], 5, 10, {"shape": "star"})
    assert [c.prompt for c in cases] == ["p1", None, "p1", None, "p1"]
    assert [c.seed for c in cases] == [10, 11, 12, 13, 14] and cases[1].embeds == "key"


@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
@pytest.mark.parametrize("method", ["closed form", "UCE"])
def test_each_method_is_undone_after_use(method):
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with attacks.erased(pipe, method, "circle", 0) as seconds:
        assert seconds >= 0
        changed = pipe.get_list_ace_adapters() or any(
            not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()
        )
        assert changed
    assert not pipe.get_list_ace_adapters()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_a_saved_run_renders_the_page_and_the_plot(tmp_path, capsys):
    page = tmp_path / "robustness.md"
    page.write_text(f"# Robustness\n\n{attacks.START}\nold\n{attacks.END}\n\nafter\n")
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result()))
    assert attacks.main(["--from-json", str(saved), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.endswith("after\n") and "| inversion: steps to 50 % |" in text
    assert "the whole run took 10 s" in text
    assert (tmp_path / "images" / "attack_budget.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        attacks.main(["--from-json", str(saved), "--docs", str(tmp_path / "missing.md")])
