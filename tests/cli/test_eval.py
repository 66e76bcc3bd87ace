import json

import pytest

from ace_diffusers.cli.eval import main
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

from ..eval.conftest import tiny_clip

QUICK = [
    "--steps",
    "2",
    "--height",
    "16",
    "--width",
    "16",
    "--images-per-prompt",
    "1",
    "--template",
    "a photo of {}",
    "--soft-steps",
    "1",
    "--soft-objective",
    "attention",
    "--soft-prompts",
    "1",
    "--judge",
    "clip",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    from ace_diffusers.testing import clip_tokenizer

    root = tmp_path_factory.mktemp("eval-cli")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "model")
    random_adapter(pipe.unet, gate_bias=6.0, magnitude=2.0).save_pretrained(root / "adapter")
    tiny_clip().save_pretrained(root / "clip")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(root / "clip")
    return root


def test_eval_command_writes_a_full_report(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "--model",
            str(assets / "model"),
            "--adapter",
            str(assets / "adapter"),
            "--concept",
            "cat",
            "--other",
            "dog",
            "--synonym",
            "kitten",
            "--neutral",
            "animal",
            "--clip-model",
            str(assets / "clip"),
            "--attacks",
            "misspelling,soft_prompt",
            "--output",
            str(out),
            *QUICK,
        ]
    )
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "report.md",
        "grid.png",
        "metrics.png",
        "attacks.png",
    }
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ace (random)" and results["judge"] == "clip" and results["processes"] == 1
    assert set(results["attacks"]) == {"misspelling", "soft_prompt"}
    assert set(results["metrics"]["after"]) == {"acc_e", "acc_g", "acc_s", "h"}
    assert "ASR misspelling" in capsys.readouterr().out


@pytest.mark.parametrize("baseline", ["uce", "esd-x"])
def test_eval_command_fits_a_baseline(assets, tmp_path, baseline):
    out = tmp_path / "eval-baseline"
    code = main(
        [
            "--model",
            str(assets / "model"),
            "--baseline",
            baseline,
            "--concept",
            "cat",
            "--other",
            "dog",
            "--clip-model",
            str(assets / "clip"),
            "--attacks",
            "none",
            "--esd-steps",
            "1",
            "--no-before",
            "--output",
            str(out),
            *QUICK,
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (
        results["method"] == baseline
        and results["baseline"]["method"] == baseline
        and results["attacks"] == {}
    )
    assert results["metrics"]["before"] is None
    assert not (out / "attacks.png").exists()


def test_eval_command_argument_errors(assets, tmp_path):
    base = ["--model", str(assets / "model"), "--concept", "cat", "--output", str(tmp_path / "x")]
    with pytest.raises(SystemExit):
        main(base + ["--other", "dog"])  # CLIP judge without --clip-model
    with pytest.raises(SystemExit):
        main(base + ["--clip-model", str(assets / "clip")])  # no --other
    with pytest.raises(SystemExit):
        main(base + ["--other", "dog", "--clip-model", str(assets / "clip"), "--attacks", "telepathy"])
