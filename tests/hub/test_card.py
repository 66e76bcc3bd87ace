"""The model card an adapter gets on the Hub: metadata, usage snippet, and what it never contains."""

from __future__ import annotations

from huggingface_hub import HfApi, ModelCard

from ace_diffusers.hub import REPO_ID_PLACEHOLDER
from ace_diffusers.hub.card import build_model_card
from ace_diffusers.hub.push import push_adapter_folder

from .conftest import CONFIG, make_fake_adapter


def test_model_card_on_the_hub(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "adapter")
    (folder / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    repo = hub_server.repo_id("card")
    eval_md = "| metric | value |\n|---|---|\n| Acc_e | 0.03 |"
    card = build_model_card(CONFIG, eval_markdown=eval_md, image_relpath="grid.png")
    push_adapter_folder(folder, repo, token=hub_server.token, model_card=card)

    loaded = ModelCard.load(repo)
    assert loaded.data.library_name == "ace-diffusers"
    assert loaded.data.base_model == CONFIG["base_model"]
    assert {"concept-erasure", "ace", "diffusers", "stable-diffusion"} <= set(loaded.data.tags)
    assert loaded.data.erased_concepts == CONFIG["concepts"]
    assert loaded.data.neutral_anchors == CONFIG["neutral"]
    text = loaded.text
    assert "Van Gogh" in text and "Starry \\| Night" in text  # table-safe
    assert "a painting" in text and "style" in text and "lambda_preserve" in text and "| Rank | 2 |" in text
    assert f'pipe.load_ace_adapter("{repo}")' in text and REPO_ID_PLACEHOLDER not in text
    assert "import ace_diffusers" in text
    assert "| Acc_e | 0.03 |" in text and "](grid.png)" in text
    assert "grid.png" in HfApi().list_repo_files(repo)
    info = HfApi().model_info(repo)
    assert info.library_name == "ace-diffusers" and "concept-erasure" in info.tags


def test_model_card_never_puts_a_local_path_in_base_model(tmp_path):
    card = build_model_card({**CONFIG, "base_model": str(tmp_path)}, repo_id="me/x")
    assert card.data.base_model is None and str(tmp_path) in card.text
    assert 'pipe.load_ace_adapter("me/x")' in card.text


def test_default_model_card_when_none_is_given(hub_server, tmp_path):
    repo = hub_server.repo_id("default-card")
    push_adapter_folder(make_fake_adapter(tmp_path / "a", base_model=None), repo, token=hub_server.token)
    card = ModelCard.load(repo)
    assert card.data.library_name == "ace-diffusers" and card.data.base_model is None
    assert f'pipe.load_ace_adapter("{repo}")' in card.text
