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


def test_card_follows_hub_conventions_and_the_hub_counts_loads(hub_server, tmp_path):
    from ace_diffusers.core.adapter import ACEAdapter

    from .conftest import small_adapter

    base = hub_server.repo_id("base-model")
    HfApi().create_repo(base, token=hub_server.token)
    HfApi().upload_file(
        path_or_fileobj=b"---\nlicense: creativeml-openrail-m\n---\n# base\n",
        path_in_repo="README.md",
        repo_id=base,
        token=hub_server.token,
    )
    adapter = small_adapter()
    adapter.base_model = base
    repo = hub_server.repo_id("conventions")
    adapter.push_to_hub(repo, token=hub_server.token, eval_results={"Acc_e": 0.03, "H": 0.91})

    card = ModelCard.load(repo)  # parsed by the Hub client, as the Hub does
    assert card.data.license == "creativeml-openrail-m"  # inherited from the base model's card
    assert card.data.pipeline_tag == "text-to-image"
    assert {"text-to-image", "diffusers", "ace", "concept-erasure"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"Acc_e": 0.03, "H": 0.91} and card.data.eval_results[0].task_type == "text-to-image"
    assert "config.json" in HfApi().list_repo_files(repo)

    before = sum(1 for _, path, _ in hub_server.server.requests if path.endswith("/config.json"))
    ACEAdapter.from_pretrained(repo, cache_dir=tmp_path / "cache")
    after = sum(1 for _, path, _ in hub_server.server.requests if path.endswith("/config.json"))
    assert after > before  # each load requests the file the Hub counts downloads by


def test_an_explicit_license_wins_and_unknown_means_none(tmp_path):
    card = build_model_card(CONFIG, license="mit")
    assert card.data.license == "mit"
    assert build_model_card(CONFIG).data.license is None
