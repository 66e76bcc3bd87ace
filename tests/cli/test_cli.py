import pytest

from ace_diffusers.cli import main
from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.testing import tiny_sd_pipeline

from ..hub_server import hub_server, hub_server_session  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "erase" in out and "bench closed-form" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "usage" in capsys.readouterr().err


def test_erase_fits_and_saves_an_adapter(model_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = main(
        [
            "erase",
            "--model",
            str(model_dir),
            "--concept",
            "Van Gogh",
            "--kind",
            "style",
            "--steps",
            "5",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    adapter = ACEAdapter.from_pretrained(out)
    assert adapter.concepts == ["Van Gogh"] and adapter.method == "ace" and adapter.kind == "style"
    assert "saved to" in capsys.readouterr().out


def test_erase_pushes_to_the_hub(model_dir, tmp_path, hub_server, monkeypatch):  # noqa: F811
    repo = hub_server.repo_id("cli-erase")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # how a CI job would authenticate
    code = main(
        [
            "erase",
            "--model",
            str(model_dir),
            "--concept",
            "cat",
            "--concept",
            "dog",
            "--steps",
            "2",
            "--no-adversarial",
            "--no-dictionary",
            "--output",
            str(tmp_path / "a"),
            "--push-to-hub",
            repo,
        ]
    )
    assert code == 0
    published = ACEAdapter.from_pretrained(repo)
    assert published.concepts == ["cat", "dog"]
    assert published.fit["fine_tuning"]["dictionary"] is False  # --no-dictionary reached the trainer


def test_erase_rejects_bad_arguments(model_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(
            [
                "erase",
                "--model",
                str(model_dir),
                "--concept",
                "x",
                "--kind",
                "animal",
                "--output",
                str(tmp_path),
            ]
        )
