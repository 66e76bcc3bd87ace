"""The trainer section of the benchmark page: an interval beside every rate, issue #22's bars checked cell
by cell, and the suite's page keeps the section when it rewrites itself."""

from ace_diffusers.bench import trainer_report

COUNTS = {"erased": 32, "synonyms": 48, "heldout": 32, "others": 112, "pairs": 64}
BASE = {
    "base_acc_e": 1.0,
    "base_acc_g": 1.0,
    "base_acc_s": 1.0,
    "base_acc_heldout": 0.9,
    "base_in_context": 1.0,
}


def row(method, **rates):
    values = {
        "acc_e": 0.0,
        "acc_g": 0.0,
        "acc_heldout": 0.0,
        "acc_s": 1.0,
        "in_context": 1.0,
        "erased_as_none": 1.0,
        **rates,
    }
    return {
        "run": "circle",
        "concept": "circle",
        "method": method,
        "seconds": 1.5,
        "counts": COUNTS,
        **BASE,
        **values,
    }


RESULT = {
    "images_per_prompt": 4,
    "torch_threads": 2,
    "seconds": 10.0,
    "rows": [row("closed form", acc_g=0.5), row("ACE (full)"), row("UCE", acc_e=0.2)],
}


def test_bars_name_the_failing_cells():
    assert trainer_report.bar_failures(row("ACE (full)")) == []
    failed = trainer_report.bar_failures(row("closed form", acc_g=0.5, in_context=0.9))
    assert any(f.startswith("acc_g 50.0%") for f in failed) and any("in_context" in f for f in failed)
    assert trainer_report.bar_failures(row("ACE (full)", acc_e=0.0625)) == ["acc_e 6.2% > 5%"]
    assert trainer_report.bar_failures(row("UCE", acc_e=1.0)) == []  # baselines have no bars


def test_every_rate_has_its_interval_and_base_rows_come_first():
    text = trainer_report.markdown(RESULT)
    assert "| circle | circle | base |" in text and text.index("| base |") < text.index("| closed form |")
    assert "50.0% (36–64)" in text  # 24 of 48 trained-synonym images
    assert "closed form: **not met**: acc_g 50.0% > 30%" in text and "ACE (full): all bars met" in text


def test_the_closed_form_is_compared_with_uce_where_it_must_beat_it():
    lines = trainer_report.versus_uce([row("closed form"), row("ACE (full)"), row("UCE", acc_heldout=0.8)])
    # UCE's H: 3 / (1 + 1 + 5)
    assert lines == ["- circle / circle: closed form H (held-out) 1.000 vs UCE 0.429: beats UCE"]
    lost = trainer_report.versus_uce([row("closed form", acc_heldout=0.9), row("ACE (full)"), row("UCE")])
    assert "**does not beat UCE**" in lost[0]
    optional = trainer_report.versus_uce(
        [row("closed form", acc_heldout=0.9), row("ACE (full)", acc_e=0.5), row("UCE")]
    )
    assert "not required" in optional[0]
    perfect = trainer_report.versus_uce([row("closed form"), row("ACE (full)"), row("UCE")])
    assert "ties UCE (both perfect" in perfect[0]


def test_esd_x_says_why_it_stopped():
    esd = {
        **row("ESD-x", acc_e=0.5),
        "esd_steps": 800,
        "esd_stop": "time budget (10x ACE's fit) at 800 steps",
    }
    text = trainer_report.markdown({**RESULT, "rows": RESULT["rows"] + [esd]})
    assert "- circle / ESD-x: stopped at the time budget (10x ACE's fit) at 800 steps" in text


def test_a_multi_concept_adapter_is_checked_against_h_090():
    multi = [{**row("ACE (full)", acc_heldout=h), "run": "multi: circle+star", "concept": c}
             for c, h in (("circle", 0.0), ("star", 0.5))]
    (line,) = trainer_report.multi_concept_h(multi)
    assert "multi: circle+star / ACE (full): H (held-out) 0.875, mean over 2 concepts" in line
    assert line.endswith("**not met**")
    assert trainer_report.multi_concept_h(RESULT["rows"]) == []  # single-concept runs are not multi
