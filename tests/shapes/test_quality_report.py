"""The quality Markdown: the table shows every cell's interval and bar; blocks are replaced in place."""

from ace_diffusers.shapes.quality import Cell
from ace_diffusers.shapes.quality_report import QUALITY, format_table, replace_block, training_summary


def test_table_rows_show_interval_bar_and_verdict():
    cells = [Cell("shape", "circle", "shape", 0.95, [("a red circle", "circle")], hits=31, n=32)]
    cells.append(Cell("style synonym", "stripy", "style", None, [("a stripy red circle", "striped")], 20, 32))
    table = format_table(cells, "cmd", {"guidance_scale": 4.0}, 12.0)
    assert "**1 of 1 bars hold.**" in table and "96.9%" in table and "✅" in table
    assert "| style synonym | stripy |" in table and "| — |" in table


def test_blocks_are_replaced_between_markers_or_appended():
    text = f"# World\n\n{QUALITY[0]}\nold\n{QUALITY[1]}\ntail\n"
    assert (
        replace_block(text, QUALITY, "new", "Quality")
        == f"# World\n\n{QUALITY[0]}\nnew\n{QUALITY[1]}\ntail\n"
    )
    appended = replace_block("# World\n", QUALITY, "new", "Quality")
    assert appended.endswith(f"## Quality\n\n{QUALITY[0]}\nnew\n{QUALITY[1]}\n")


def test_training_summary_reads_the_bundled_metadata(tmp_path):
    assert training_summary(tmp_path) is None  # no train_meta.json: no summary
    import json

    from ace_diffusers.shapes.pipeline import WEIGHTS_DIR

    meta = json.loads((WEIGHTS_DIR / "train_meta.json").read_text())
    summary = training_summary()
    assert f"| UNet | {meta['unet']['steps']} x {meta['args']['batch_unet']} |" in summary
    assert f"command `{meta['command'].strip()}`" in summary and "zero terminal SNR" in summary


def test_the_figure_has_a_row_per_group():
    import io

    import torch
    from PIL import Image

    from ace_diffusers.shapes.quality_report import figure_png

    cells = [
        Cell("neutral", "''", "shape", 0.9, [("", "none")]),
        Cell("pair", "left shape", "left_shape", 0.85, [("a red circle and a blue square", "circle")]),
    ]
    images = {p: torch.rand(2, 3, 32, 64) for c in cells for p, _ in c.items}
    png = Image.open(io.BytesIO(figure_png(cells, images)))
    assert png.size == (80 + 8 * (192 + 2), 2 * (96 + 2))
