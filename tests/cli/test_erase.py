"""``ace-diffusers erase``: fit an adapter for a saved pipeline and write it, from the command line."""

import pytest

from ace_diffusers.cli import main
from ace_diffusers.cli.erase import build_parser, load_model
from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.testing import tiny_sd_pipeline


def test_erase_a_saved_pipeline_in_closed_form(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_sd_pipeline().save_pretrained(model)
    out = tmp_path / "erase-van-gogh"
    code = main(
        [
            "erase",
            "--model",
            str(model),
            "--concept",
            "Van Gogh",
            "--kind",
            "style",
            "--steps",
            "0",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and "saved to" in capsys.readouterr().out
    adapter = ACEAdapter.from_pretrained(out)
    assert (
        adapter.concepts == ["Van Gogh"]
        and adapter.kind == "style"
        and adapter.fit["fine_tuning"]["steps_run"] == 0
    )
    assert type(load_model(str(model))).__name__ == "StableDiffusionPipeline"


def test_the_parser_takes_repeatable_concepts_and_refuses_unknown_kinds():
    args = build_parser().parse_args(["--model", "m", "--concept", "a", "--concept", "b", "--output", "o"])
    assert args.concept == ["a", "b"] and args.steps is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--concept", "a", "--output", "o", "--kind", "painting"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_is_fine_tuned_from_the_command_line_and_steps_0_gives_the_closed_form(
    family, tmp_path, capsys
):
    from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sd3_pipeline

    model = tmp_path / family
    (tiny_sd3_pipeline(t5=True) if family == "sd3" else tiny_flux_pipeline()).save_pretrained(model)
    base = ["erase", "--model", str(model), "--concept", "Van Gogh", "--kind", "style"]
    for steps in ("20", "0"):
        out = tmp_path / f"erase-{steps}"
        assert main([*base, "--steps", steps, "--synonym", "Vincent", "--output", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "saved to" in printed and "pooled" in printed  # the pooled projection is erased too
        adapter = ACEAdapter.from_pretrained(out)
        assert adapter.concepts == ["Van Gogh"] and adapter.pooled is not None
        assert adapter.fit["fine_tuning"]["steps_run"] == int(steps)
        assert adapter.fit["fine_tuning"]["user_synonyms"] == ["Vincent"]
