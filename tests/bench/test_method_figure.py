"""``ace-diffusers figures``: the method figure is computed from a real erasure and says what its caption
says."""

import io

import pytest
from PIL import Image

from ace_diffusers.bench.method_figure import (
    DEFAULT_PROMPTS,
    PAD_LABEL,
    MethodFigureData,
    PromptTokens,
    method_figure_data,
    prompt_role,
    render_method_figure,
)
from ace_diffusers.cli import main
from ace_diffusers.shapes.erasure import erase_arguments
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, load_shapes_pipeline, weights_present

needs_weights = pytest.mark.skipif(
    not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}"
)


def _data(stats=None, shared=True):
    rows = [
        PromptTokens(
            "a red circle",
            "erased word",
            ["[CLS]", "a", "red", "circle", f"{PAD_LABEL}×3"],
            [0.95, 0.96, 0.97, 0.99, 0.9],
            [1.0, 2.0, 3.0, 4.0, 1.0],
            [1.0, 2.0, 3.0, 4.0, 1.0],
        ),
        PromptTokens(
            "",
            "empty prompt (guidance)",
            ["[CLS]", f"{PAD_LABEL}×3"],
            [0.001, 0.002],
            [1e-4, 0.0],
            [2.0, 3.0],
        ),
    ]
    return MethodFigureData("circle", "", 4, 2, shared, stats or {}, rows)


@pytest.mark.parametrize(
    "prompt, role",
    [
        ("a red circle", "erased word"),
        ("a green disc", "held-out synonym"),
        ("a blue square", "another concept (preserved)"),
        ("", "empty prompt (guidance)"),
        ("a picture", "other prompt"),
    ],
)
def test_prompt_roles(prompt, role):
    assert prompt_role(prompt, "circle") == role


def test_render_is_a_png_without_version_metadata_and_reproducible():
    data = _data({"gate_concept_tokens_open": 0.9, "gate_other_tokens_open": 0.01})
    png = render_method_figure(data)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (
            660,
            660,
        )  # 3 inches per prompt + 0.6, 6.6 high, 100 dpi
    assert b"Software" not in png[:4096]
    assert render_method_figure(data) == png
    assert render_method_figure(_data(shared=False)) != png  # the caption follows the data


@needs_weights
def test_figures_command_writes_the_method_png(tmp_path, capsys):
    path = tmp_path / "images" / "method.png"
    assert main(["figures", "--output", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert b"Software" not in data[:4096]  # no version metadata: reruns give the same bytes
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "'a green disc'" in out


def test_figures_command_rejects_an_unknown_concept(tmp_path):
    with pytest.raises(SystemExit):
        main(["figures", "--concept", "blob", "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


@needs_weights
def test_method_figure_shows_what_its_caption_says():
    """docs/method.md describes the figure in words; these are the numbers behind those words."""
    pipe = load_shapes_pipeline()
    pipe.erase_concept(**erase_arguments("circle"), adapter_name="figure")
    data = method_figure_data(pipe, "figure", "circle", list(DEFAULT_PROMPTS))
    assert data.shared_gate and data.concept == "circle" and data.rank > 0 and data.layers > 0
    rows = {r.prompt: r for r in data.rows}
    assert set(rows) == {"a red circle", "a green disc", "a blue square", ""}
    assert min(rows["a red circle"].gate) > 0.9  # bidirectional encoder: every position carries it
    disc = rows["a green disc"]  # never given to the fit: it mined the word from the model
    assert disc.role == "synonym mined from the model" and disc.gate[disc.tokens.index("disc")] > 0.9
    assert disc.tokens[-1].startswith(PAD_LABEL + "×")  # the padding positions, averaged into one bar
    for prompt in ("a blue square", ""):  # gate closed; the ungated edit would move every token
        row = rows[prompt]
        assert max(row.gate) < 0.01 and max(row.change_gated) < 0.01
        assert min(row.change_ungated) > 10 * max(row.change_gated)


def test_a_mined_word_is_named_as_such():
    assert prompt_role("a green disc", "circle", ["disc", "ring"]) == "synonym mined from the model"
