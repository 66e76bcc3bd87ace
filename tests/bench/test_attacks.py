"""``ace-diffusers bench attacks``: each method's state is undone after use, the defended state fits with
both of the trainer's defences, rates carry their intervals, and saved runs (one, or several combined)
re-render the page and its plot without generating anything."""

import functools
import json

import pytest
import torch

from ace_diffusers.bench import attacks
from ace_diffusers.eval.plans import EvalCase
from ace_diffusers.fitting import trainer as trainer_module
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present
from ace_diffusers.testing import tiny_sd_pipeline

from .test_attacks_report import defended_run, result


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


def test_the_defended_state_fits_with_both_defences_and_is_undone(monkeypatch):
    pipe = tiny_sd_pipeline()
    searched = []

    def short_search(embedder, layers, spec, *, per_concept, seed):  # a short search: this checks the wiring
        searched.append(per_concept)
        return search(embedder, layers, spec, per_concept=per_concept, seed=seed, steps=2, candidates=8,
                      top_k=8)

    search = trainer_module.search_phrases
    monkeypatch.setattr(trainer_module, "search_phrases", short_search)
    short = functools.partial(trainer_module.ACETrainer, steps=4, mined_synonyms=0, queries_per_layer=8,
                              batch_size=8)
    monkeypatch.setattr(attacks, "ACETrainer", short)
    tuning = {}
    for method in ("ACE (full)", "ACE (defended)"):
        with attacks.erased(pipe, method, "circle", 0) as seconds:
            tuning[method] = pipe.get_ace_adapter().fit["fine_tuning"]
            assert seconds > 0
        assert not pipe.get_list_ace_adapters()
    assert searched == [0, attacks.DEFENCES["search_phrases"]]
    assert tuning["ACE (full)"]["concept_vectors"] == 0 and "concept vectors" not in tuning["ACE (full)"][
        "phase_seconds"]
    defended = tuning["ACE (defended)"]
    assert defended["concept_vectors"] == attacks.DEFENCES["concept_vectors"] > 0
    assert defended["phase_seconds"]["concept vectors"] > 0  # the defence's pairs were built and trained on
    assert "ACE (defended)" in attacks.METHODS and attacks.METHODS.index("ACE (defended)") == 3


def test_several_saved_runs_render_one_page_naming_every_command(tmp_path):
    page = tmp_path / "robustness.md"
    page.write_text(f"# Robustness\n\n{attacks.START}\nold\n{attacks.END}\n")
    full, new = tmp_path / "full.json", tmp_path / "defended.json"
    full.write_text(json.dumps(result()))
    new.write_text(json.dumps(defended_run()))
    assert attacks.main(["--from-json", str(full), str(new), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "| attack | base | ACE (full) | ACE (defended) | UCE | ESD-x |" in text
    written = next(line for line in text.splitlines() if line.startswith("Written by"))
    assert "`ace-diffusers bench attacks` (base, ACE (full), UCE, ESD-x)" in written
    assert "`ace-diffusers bench attacks --methods 'ACE (defended)'` (ACE (defended))" in written
    combining = "ace-diffusers bench attacks --from-json full.json defended.json --docs robustness.md"
    assert f"combined by `{combining}`" in written
    assert "test, 10 s; `ace-diffusers bench attacks --methods 'ACE (defended)'` on test, 7 s." in text


def test_runs_of_other_budgets_are_refused(tmp_path, capsys):
    full, new = tmp_path / "full.json", tmp_path / "defended.json"
    full.write_text(json.dumps(result()))
    new.write_text(json.dumps({**defended_run(), "budgets": [0, 50, 100]}))
    with pytest.raises(SystemExit):
        attacks.main(["--from-json", str(full), str(new), "--no-docs"])
    error = capsys.readouterr().err
    assert "--from-json: cannot combine runs of different budgets" in error and "[0, 50, 100]" in error
