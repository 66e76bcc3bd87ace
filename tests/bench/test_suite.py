"""``ace-diffusers bench``: the plan from the command line, the sections run, re-rendering a saved result."""

import copy
import json

import pytest

from ace_diffusers.bench import efficacy_plans as efficacy
from ace_diffusers.bench import report, suite
from ace_diffusers.bench.suite import efficacy_plan, main

from .conftest import fake_result


def test_plan_overrides_from_the_command_line():
    plan = efficacy_plan(True, {"shapes": ["star"], "multi": [3], "inference_steps": 5, "ace_steps": None})
    assert plan.shapes == ["star"] and plan.multi == {3: efficacy.MULTI_CONCEPTS[3]}
    assert plan.sampler == {"num_inference_steps": 5} and plan.ace_steps == efficacy.QUICK.ace_steps
    assert efficacy_plan(False, {"multi": []}).multi == {}
    with pytest.raises(ValueError):
        efficacy_plan(True, {"multi": [4]})


def test_quick_and_full_plans_without_overrides():
    assert efficacy_plan(True) == efficacy.QUICK and efficacy_plan(False) == efficacy.FULL
    assert efficacy_plan(True, {"images_per_prompt": 3}).images_per_prompt == 3
    assert efficacy.QUICK.images_per_prompt == 1  # the module's plan is left as it was
    assert efficacy_plan(True, {"multi": [5, 1]}).multi == {5: efficacy.MULTI_CONCEPTS[5], 1: ["square"]}


def test_run_without_sections_measures_nothing():
    assert suite.run(True, []) == {"sections": {}}


def test_from_json_rerenders_without_running(tmp_path, capsys):
    result = fake_result()
    source = tmp_path / "saved.json"
    source.write_text(json.dumps(result))
    output = tmp_path / "out" / "benchmarks.md"
    assert main(["--from-json", str(source), "--output", str(output)]) == 0
    assert output.read_text() == report.markdown(copy.deepcopy(result), "images")
    out = capsys.readouterr().out
    assert "target inference overhead ≤ 1.10× (100 concepts): 1.120× -> NOT MET" in out
    assert f"[bench] wrote {output.parent / 'images' / report.PLOTS['h']}" in out
    assert (output.parent / "benchmarks.json").exists()


def test_unknown_section_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--sections", "everything"])
    assert "invalid choice: 'everything'" in capsys.readouterr().err


def test_update_replaces_the_sections_run_and_names_every_run(tmp_path, monkeypatch):
    """``--update`` re-runs only the chosen sections: the others stay as the page's JSON had them, and
    the command line names each run with the sections it measured."""
    previous = fake_result()
    previous.update(command="ace-diffusers bench --quick", date="2026-01-01 10:00 UTC", seconds=100.0)
    output = tmp_path / "benchmarks.md"
    output.with_suffix(".json").write_text(json.dumps(previous))
    fresh = copy.deepcopy(previous["sections"]["inference"])
    fresh["seconds"] = 7.0
    monkeypatch.setattr(suite, "run", lambda quick, sections, **kw: {"sections": {"inference": fresh}})
    assert main(["--sections", "inference", "--update", "--output", str(output)]) == 0
    written = json.loads(output.with_suffix(".json").read_text())
    assert written["sections"]["efficacy"] == previous["sections"]["efficacy"]
    assert written["sections"]["inference"]["seconds"] == 7.0
    assert [r["sections"] for r in written["runs"]] == [
        [s for s in previous["sections"] if s != "inference"], ["inference"]
    ]
    assert written["command"].startswith("ace-diffusers bench --quick (efficacy")
    assert "--sections inference --update" in written["command"] and "(inference; 20" in written["command"]
    assert written["command"] in output.read_text()
    again = suite.updated(written, {**written, "sections": {"efficacy": previous["sections"]["efficacy"]}})
    assert [r["sections"] for r in again["runs"]][-1] == ["efficacy"]
