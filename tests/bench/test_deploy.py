"""``ace-diffusers bench deploy`` report formatting and docs-section writing (no generation)."""

from pathlib import Path

import pytest

from ace_diffusers.bench import deploy
from ace_diffusers.bench.deploy import END, START, format_section, main, replace_section, write_section

ROOT = Path(__file__).resolve().parents[2]
BOUNDS = {"shape": "circle", "acc_e_max": 0.375, "acc_s_min": 0.85}


def metrics(acc_e, acc_g, acc_s, colour, h):
    return {"acc_e": acc_e, "acc_g": acc_g, "acc_s": acc_s, "colour": colour, "h": h}


def fidelity(k, v, edit, gated, fused_change, prompts=8):
    return {
        "k_rel_error": k,
        "v_rel_error": v,
        "edit_rel_error": edit,
        "gated_change": gated,
        "fused_change": fused_change,
        "prompts": prompts,
        "tokens": 16 * prompts,
    }


@pytest.fixture
def result():
    rows = []
    for shape, fused_e in (("circle", 0.125), ("square", 0.5)):
        rows += [
            {"shape": shape, "model": "base", **metrics(1.0, 1.0, 0.964, 0.982, 0.0)},
            {"shape": shape, "model": "ace", **metrics(0.0, 0.875, 1.0, 1.0, 0.3)},
            {"shape": shape, "model": "fused", **metrics(fused_e, 0.75, 1.0, 0.9, 0.5)},
        ]
    return {
        "shapes": ["circle", "square"],
        "images_per_prompt": 1,
        "seed": 0,
        "sampler": {"num_inference_steps": 25},
        "rows": rows,
        "fidelity": {
            "circle": {
                "unrelated": fidelity(0.024, 0.029, 446.7, 3.6e-5, 0.025, 15),
                "concept": fidelity(0.0126, 0.0157, 0.0321, 0.407, 0.405),
            },
            "square": {"concept": fidelity(0.02, 0.03, 0.05, 0.5, 0.49)},
        },
        "lora_vs_fused_max_abs": {"circle": 1.4e-5, "square": 0.0},
        "seconds_per_shape": {"circle": 90.0, "square": 91.0},
        "bounds": BOUNDS,
    }


def test_format_section_tables(result):
    text = format_section(result, "ace-diffusers bench deploy --quick", "a test machine", 181.4)
    lines = text.splitlines()
    assert "- command: `ace-diffusers bench deploy --quick`" in lines
    assert "- machine: a test machine" in lines
    assert any(line.startswith("- time: 181 s;") and "1 image(s) per prompt" in line for line in lines)
    # metrics: one row per shape and model, in MODELS order, percentages with one decimal
    assert "| circle | fused (`fuse_ace_adapter`) | 12.5% | 75.0% | 100.0% | 90.0% | 50.0% |" in lines
    assert "| square | base model | 100.0% | 100.0% | 96.4% | 98.2% | 0.0% |" in lines
    table = [
        line
        for line in lines
        if line.startswith(("| circle | ", "| square | ", "| **mean** | ")) and "%" in line
    ]
    assert [line.split(" | ")[1] for line in table[:3]] == [
        "base model",
        "gated ACE adapter",
        "fused (`fuse_ace_adapter`)",
    ]
    assert len(table) == 9  # 2 shapes x 3 models + 3 means; models that were not measured get no row
    assert "| **mean** | fused (`fuse_ace_adapter`) | 31.2% | 75.0% | 100.0% | 90.0% | 50.0% |" in lines
    assert not any("LoRA" in line for line in table)
    # fidelity: known sets first, edit error only for the concept set, tiny values in scientific notation
    circle = [
        line
        for line in lines
        if line.startswith("| circle | concept |") or line.startswith("| circle | unrelated |")
    ]
    assert circle == [
        "| circle | concept | 8 | 0.013 | 0.016 | 0.032 | 0.407 | 0.405 |",
        "| circle | unrelated | 15 | 0.024 | 0.029 | — | 3.6e-05 | 0.025 |",
    ]
    assert "largest pixel difference (images in [0, 1]): circle 1.4e-05, square 0.0e+00." in text
    # bounds stated, and each fused row checked against them
    assert "Acc_e ≤ 37.5%, Acc_s ≥ 85.0%." in text
    assert "Fused rows above against these bounds: circle ✅, square ❌." in lines


def test_within_bounds_edges():
    assert deploy.within_bounds({"acc_e": 0.375, "acc_s": 0.85}, BOUNDS)
    assert not deploy.within_bounds({"acc_e": 0.376, "acc_s": 1.0}, BOUNDS)
    assert not deploy.within_bounds({"acc_e": 0.0, "acc_s": 0.84}, BOUNDS)


def test_replace_section_keeps_the_hand_written_text():
    page = f"# Title\n\nintro\n\n{START}\nold figures\n{END}\n\n## After\n\ntail\n"
    new = replace_section(page, "new figures")
    assert new == f"# Title\n\nintro\n\n{START}\nnew figures\n{END}\n\n## After\n\ntail\n"
    assert replace_section(new, "new figures") == new  # idempotent
    appended = replace_section("# Title\n\nintro\n", "figures")
    assert appended == f"# Title\n\nintro\n\n## Measured on the miniature world\n\n{START}\nfigures\n{END}\n"
    for broken in (f"{START}\n{START}\nx\n{END}", f"{END}\nx\n{START}", f"{START}\nx\n"):
        with pytest.raises(ValueError, match="expected one"):
            replace_section(broken, "figures")


def test_write_section_replaces_atomically(tmp_path):
    page = tmp_path / "deploy.md"
    page.write_text(f"before\n{START}\nold\n{END}\nafter\n", encoding="utf-8")
    assert write_section(page, "Acc_e ↓ table") == page
    assert page.read_text(encoding="utf-8") == f"before\n{START}\nAcc_e ↓ table\n{END}\nafter\n"
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.md"]  # no temporary file left behind
    broken = f"{END}\n{START}\n"
    page.write_text(broken)
    with pytest.raises(ValueError):
        write_section(page, "figures")
    assert page.read_text() == broken  # a failure leaves the page as it was


def test_main_rejects_bad_arguments_before_generating(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--shapes", "circle", "blob", "--no-docs"])
    assert "unknown shape(s) ['blob']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--docs", str(tmp_path / "missing.md")])
    assert "missing.md not found" in capsys.readouterr().err


def test_docs_state_the_current_bounds_and_quote_no_figures_outside_the_section():
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert text.count(START) == text.count(END) == 1
    pre, rest = text.split(START, 1)
    section, post = rest.split(END, 1)
    assert "- command: `ace-diffusers bench deploy" in section
    bounds = deploy.RELOAD_BOUNDS
    assert f"Acc_e ≤ {100 * bounds['acc_e_max']:.1f}%, Acc_s ≥ {100 * bounds['acc_s_min']:.1f}%." in section
    assert f'with "{deploy.RELOAD_TEST_SHAPE}" erased' in section
    assert "%" not in pre + post  # measured figures live only in the generated section
