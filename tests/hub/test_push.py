"""Hub I/O against a local Hub-protocol server, driven by the *real* ``huggingface_hub`` client.

Nothing of ours is mocked: ``push_adapter_folder``/``resolve_adapter_dir``/``ACEAdapter`` talk HTTP
to ``tests/hub_server.py`` on 127.0.0.1, through the genuine client, its cache and offline logic.
"""

from __future__ import annotations

import json
import socket
import time
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import save_file

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.core.factors import LayerFactors
from ace_diffusers.errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ace_diffusers.hub import CONFIG_NAME, REPO_ID_PLACEHOLDER, WEIGHTS_NAME
from ace_diffusers.hub.card import build_model_card
from ace_diffusers.hub.download import resolve_adapter_dir
from ace_diffusers.hub.push import push_adapter_folder

try:  # tests/ is a package
    from ..hub_server import configure_client, hub_server, hub_server_session  # noqa: F401
except ImportError:  # tests/ on sys.path (rootdir-relative import)
    from hub_server import configure_client, hub_server, hub_server_session  # noqa: F401


CONFIG = {
    "format_version": 1,
    "concepts": ["Van Gogh", "Starry | Night"],
    "neutral": ["a painting", ""],
    "kind": "style",
    "rank": 2,
    "method": "closed-form",
    "fit": {"lambda_preserve": 0.1, "templates": 12, "adversarial": {"steps": 3}},
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "fingerprint": {"layers": {"mid.attn2": [8, 4, 4]}, "hash": "0123456789abcdef"},
    "created_with": "ace-diffusers test",
}


def make_fake_adapter(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """The two files of an adapter folder, written without ACEAdapter (safetensors + JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"mid.attn2.k_down": torch.randn(2, 8, generator=g)}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({**CONFIG, **overrides}, indent=2))
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def small_adapter(seed: int = 0, concepts=("Van Gogh",)) -> ACEAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        f"up_blocks.{i}.attentions.0.transformer_blocks.0.attn2": LayerFactors(
            k_down=torch.randn(3, 16, generator=g),
            k_up=torch.randn(8, 3, generator=g),
            v_down=torch.randn(3, 16, generator=g),
            v_up=torch.randn(8, 3, generator=g),
            gate_weight=torch.randn(16, generator=g),
            gate_bias=torch.randn(1, generator=g),
        )
        for i in range(2)
    }
    return ACEAdapter(
        layers, concepts=list(concepts), neutral=["a painting"] * len(concepts), kind="style", base_model="tiny/sd"
    )


def assert_same_adapter(a: ACEAdapter, b: ACEAdapter) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------ the fixture itself
def test_fixture_points_the_real_client_at_the_local_hub(hub_server):
    assert constants.ENDPOINT == hub_server.endpoint and hub_server.endpoint.startswith("http://127.0.0.1:")
    assert not constants.is_offline_mode() and constants.HF_HUB_DISABLE_XET
    assert constants.HF_HUB_CACHE == str(hub_server.cache_dir)
    assert huggingface_hub.whoami(token=hub_server.token)["name"] == hub_server.user  # module-level api too
    assert huggingface_hub.get_token() is None  # no machine login leaks into "anonymous" requests


def test_configure_client_is_undone(hub_server_session, tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HUGGINGFACE_CO_URL_TEMPLATE)
    mp = pytest.MonkeyPatch()
    configure_client(mp, hub_server_session.endpoint, tmp_path / "c", tmp_path / "h")
    assert constants.ENDPOINT == hub_server_session.endpoint and constants.HF_HUB_OFFLINE is False
    mp.undo()
    assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HUGGINGFACE_CO_URL_TEMPLATE) == before


def test_server_speaks_enough_hub_for_the_client(hub_server, tmp_path):
    api = HfApi(token=hub_server.token)
    repo = api.create_repo("srv", private=True).repo_id  # namespace from the token
    assert repo == f"{hub_server.user}/srv"
    api.create_repo(repo, exist_ok=True)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError):
        api.create_repo(repo)  # 409 without exist_ok
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    first = api.upload_folder(folder_path=src, repo_id=repo)
    api.create_tag(repo, tag="t1")
    api.create_branch(repo, branch="dev")
    api.upload_file(path_or_fileobj=b"new", path_in_repo="a.txt", repo_id=repo, revision="dev")
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a.txt", "sub/b.bin"]
    info = api.model_info(repo, files_metadata=True)
    assert info.sha == first.oid and info.private is True
    dev_info = api.model_info(repo, revision="dev")
    assert dev_info.sha != first.oid and dev_info.sha == api.list_repo_refs(repo).branches[0].target_commit
    assert api.model_info(repo, revision="t1").sha == first.oid
    assert {s.rfilename: s.size for s in info.siblings}["sub/b.bin"] == 2560
    refs = api.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["t1"]
    assert [c.title for c in api.list_repo_commits(repo, revision="dev")][0] == "Upload a.txt with huggingface_hub"
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(repo)}
    assert tree == {".gitattributes": "RepoFile", "a.txt": "RepoFile", "sub": "RepoFolder"}
    snap = Path(huggingface_hub.snapshot_download(repo, revision="dev", token=hub_server.token))
    assert (snap / "a.txt").read_text() == "new" and (snap / "sub" / "b.bin").stat().st_size == 2560
    by_tag = huggingface_hub.hf_hub_download(repo, "a.txt", revision="t1", token=hub_server.token)
    by_sha = huggingface_hub.hf_hub_download(repo, "a.txt", revision=first.oid, token=hub_server.token)
    assert Path(by_tag).read_text() == Path(by_sha).read_text() == "a"
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        HfApi(token=False).model_info(repo)  # private: 401 RepoNotFound when anonymous
    assert api.file_exists(repo, "sub/b.bin") and not api.file_exists(repo, "nope")
    api.delete_repo(repo)
    assert not api.repo_exists(repo)
    assert hub_server.server.unhandled == []


# ------------------------------------------------------------------------------ push / download
def test_push_then_download_by_repo_id_is_byte_identical(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "adapter")
    repo = hub_server.repo_id("van-gogh")
    url = push_adapter_folder(folder, repo, token=hub_server.token)
    assert url.startswith(f"{hub_server.endpoint}/{repo}/commit/")
    assert sorted(HfApi().list_repo_files(repo)) == sorted([".gitattributes", "README.md", CONFIG_NAME, WEIGHTS_NAME])
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # the folder is untouched

    got = resolve_adapter_dir(repo)  # public repo: no token needed
    assert files_of(got) == files_of(folder)
    assert got.parent.name == "snapshots" and got.name == url.rsplit("/", 1)[1]  # both files of one commit
    assert str(got).startswith(str(hub_server.cache_dir))
    other_cache = tmp_path / "other-cache"
    assert files_of(resolve_adapter_dir(repo, cache_dir=other_cache)) == files_of(folder)
    assert str(resolve_adapter_dir(repo, cache_dir=other_cache)).startswith(str(other_cache))


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


def test_revision_pinning_tags_commits_and_branches(hub_server, tmp_path):
    repo = hub_server.repo_id("pinned")
    v1, v2 = make_fake_adapter(tmp_path / "v1", seed=1), make_fake_adapter(tmp_path / "v2", seed=2)
    url1 = push_adapter_folder(v1, repo, token=hub_server.token, commit_message="v1")
    HfApi(token=hub_server.token).create_tag(repo, tag="v1")
    push_adapter_folder(v2, repo, token=hub_server.token)
    assert files_of(resolve_adapter_dir(repo, revision="v1")) == files_of(v1)
    assert files_of(resolve_adapter_dir(repo)) == files_of(v2)
    assert files_of(resolve_adapter_dir(repo, revision=url1.rsplit("/", 1)[1])) == files_of(v1)

    v3 = make_fake_adapter(tmp_path / "v3", seed=3)
    push_adapter_folder(v3, repo, token=hub_server.token, revision="experiment")  # a new branch
    assert files_of(resolve_adapter_dir(repo, revision="experiment")) == files_of(v3)
    assert files_of(resolve_adapter_dir(repo, revision="main")) == files_of(v2)
    with pytest.raises(ACEHubError, match=r"Revision 'nope' does not exist in ACE adapter repo .*pinned"):
        resolve_adapter_dir(repo, revision="nope")
    with pytest.raises(ACEValueError, match="tag"):
        push_adapter_folder(v3, repo, token=hub_server.token, revision="v1")
    with pytest.raises(ACEValueError, match="commit sha"):
        push_adapter_folder(v3, repo, token=hub_server.token, revision=url1.rsplit("/", 1)[1])


def test_create_pr(hub_server, tmp_path):
    repo = hub_server.repo_id("pr")
    base, proposal = make_fake_adapter(tmp_path / "b", seed=1), make_fake_adapter(tmp_path / "p", seed=2)
    push_adapter_folder(base, repo, token=hub_server.token)
    url = push_adapter_folder(proposal, repo, token=hub_server.token, create_pr=True)
    assert url == f"{hub_server.endpoint}/{repo}/discussions/1"
    assert files_of(resolve_adapter_dir(repo)) == files_of(base)
    assert files_of(resolve_adapter_dir(repo, revision="refs/pr/1")) == files_of(proposal)


def test_subfolder(hub_server, tmp_path):
    repo = hub_server.repo_id("multi")
    api = HfApi(token=hub_server.token)
    api.create_repo(repo)
    folder = make_fake_adapter(tmp_path / "a")
    api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="adapters/style")
    got = resolve_adapter_dir(repo, subfolder="adapters/style")
    assert files_of(got) == files_of(folder) and got.parts[-2:] == ("adapters", "style")
    with pytest.raises(ACEAdapterFormatError, match=r"no ace_config\.json.*subfolder=") as err:
        resolve_adapter_dir(repo)
    assert "adapters/style/ace_config.json" in str(err.value)  # what the repo holds instead
    assert resolve_adapter_dir(tmp_path, subfolder="a") == tmp_path / "a"  # local folders take it too


# ------------------------------------------------------------------------------ private repos / tokens
def test_private_repo_needs_a_valid_token(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "a")
    repo = hub_server.repo_id("secret")
    push_adapter_folder(folder, repo, token=hub_server.token, private=True)
    assert HfApi(token=hub_server.token).model_info(repo).private is True

    with pytest.raises(ACEHubError, match=r"(?s)'ace-tester/secret'.*no token was sent.*hf auth login"):
        resolve_adapter_dir(repo)
    with pytest.raises(ACEHubError, match=r"rejected the token.*invalid or expired.*hf auth login"):
        resolve_adapter_dir(repo, token="hf_not_a_real_token")
    with pytest.raises(ACEHubError, match=r"'ace-tester/secret'.*token sent has no access"):
        resolve_adapter_dir(repo, token=hub_server.server.other_token)
    assert files_of(resolve_adapter_dir(repo, token=hub_server.token)) == files_of(folder)
    assert files_of(resolve_adapter_dir(repo, token=hub_server.server.read_token)) == files_of(folder)


def test_gated_repo(hub_server, tmp_path):
    repo = hub_server.repo_id("gated")
    push_adapter_folder(make_fake_adapter(tmp_path / "a"), repo, token=hub_server.token)
    hub_server.server.set_gated(repo)
    with pytest.raises(ACEHubError, match=r"is gated: request access"):
        resolve_adapter_dir(repo, token=hub_server.server.other_token)


def test_push_errors_are_clear(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "a")
    repo = hub_server.repo_id("push-errors")
    with pytest.raises(ACEHubError, match=r"needs a Hugging Face token.*hf auth login"):
        push_adapter_folder(folder, repo)
    with pytest.raises(ACEHubError, match=r"rejected the token"):
        push_adapter_folder(folder, repo, token="hf_bad")
    with pytest.raises(ACEHubError, match=r"403 Forbidden.*'write' role"):
        push_adapter_folder(folder, repo, token=hub_server.server.read_token)
    with pytest.raises(ACEHubError, match=r"403 Forbidden"):
        push_adapter_folder(folder, repo, token=hub_server.server.other_token)  # someone else's namespace
    push_adapter_folder(folder, repo, token=hub_server.token)
    with pytest.raises(ACEHubError, match=r"write access"):
        push_adapter_folder(folder, repo, token=hub_server.server.other_token)  # exists, not theirs
    with pytest.raises(ACEValueError, match="not a valid Hub repo id"):
        push_adapter_folder(folder, "a/b/c", token=hub_server.token)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ACEAdapterFormatError, match=r"no ace_config\.json and no ace_adapter\.safetensors"):
        push_adapter_folder(tmp_path / "empty", repo, token=hub_server.token)
    short = push_adapter_folder(folder, "no-namespace", token=hub_server.token)  # the token's user
    assert short.startswith(f"{hub_server.endpoint}/{hub_server.user}/no-namespace/commit/")
    org_repo = f"{hub_server.server.org}/shared"
    assert push_adapter_folder(folder, org_repo, token=hub_server.token).startswith(f"{hub_server.endpoint}/{org_repo}")
    hub_server.set_offline(True)
    with pytest.raises(ACEHubError, match=r"offline mode is on.*HF_HUB_OFFLINE=0"):
        push_adapter_folder(folder, repo, token=hub_server.token)


# ------------------------------------------------------------------------------ offline / cache
def test_offline_uses_the_cache_and_explains_misses(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "a")
    repo = hub_server.repo_id("cached")
    push_adapter_folder(folder, repo, token=hub_server.token)
    push_adapter_folder(make_fake_adapter(tmp_path / "other"), hub_server.repo_id("never"), token=hub_server.token)
    online = resolve_adapter_dir(repo)

    hub_server.set_offline(True)
    # the server records a request after answering it: let the last online one land before counting
    n_requests = -1
    while n_requests != len(hub_server.server.requests):
        n_requests = len(hub_server.server.requests)
        time.sleep(0.2)
    assert resolve_adapter_dir(repo) == online
    assert files_of(resolve_adapter_dir(repo)) == files_of(folder)
    assert len(hub_server.server.requests) == n_requests  # not a single HTTP request while offline
    with pytest.raises(ACEHubError, match=r"(?s)'ace-tester/never' was never downloaded.*HF_HUB_OFFLINE=0"):
        resolve_adapter_dir(hub_server.repo_id("never"))
    with pytest.raises(ACEHubError, match=r"(?s)revision 'v9'.*never downloaded"):
        resolve_adapter_dir(repo, revision="v9")

    hub_server.set_offline(False)
    assert resolve_adapter_dir(repo, local_files_only=True) == online
    with pytest.raises(ACEHubError, match=r"(?s)never downloaded.*local_files_only=True.*local_files_only=False"):
        resolve_adapter_dir(hub_server.repo_id("never"), local_files_only=True)


def test_unreachable_hub_is_reported(hub_server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    # the client retries a refused connection 5 times with backoff (~23 s): skip the waiting
    from huggingface_hub.utils import _http

    no_sleep = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    no_sleep.sleep = lambda seconds: None
    monkeypatch.setattr(_http, "time", no_sleep)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(ACEHubError, match=r"Could not reach the Hugging Face Hub at http://127\.0\.0\.1"):
        resolve_adapter_dir("someone/anything")


# ------------------------------------------------------------------------------ not an adapter / bad input
def test_repo_that_is_not_an_ace_adapter(hub_server, tmp_path):
    api = HfApi(token=hub_server.token)
    repo = hub_server.repo_id("a-lora")
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="adapter_config.json", repo_id=repo)
    with pytest.raises(ACEAdapterFormatError, match=r"(?s)'ace-tester/a-lora' is not an ACE adapter: it has no ace_config\.json.*ACE adapters contain.*It contains: adapter_config\.json"):
        resolve_adapter_dir(repo)

    half = hub_server.repo_id("half")
    api.create_repo(half)
    api.upload_file(path_or_fileobj=json.dumps(CONFIG).encode(), path_in_repo=CONFIG_NAME, repo_id=half)
    with pytest.raises(ACEAdapterFormatError, match=r"no ace_adapter\.safetensors"):
        resolve_adapter_dir(half)


def test_missing_repo_and_bad_paths(hub_server, tmp_path, monkeypatch):
    with pytest.raises(ACEHubError, match=r"(?s)Could not find ACE adapter repo 'ace-tester/nothing-here'.*no local folder"):
        resolve_adapter_dir("ace-tester/nothing-here")
    monkeypatch.chdir(tmp_path)
    for bad in ("./adapters/mine", "/definitely/not/here", "a/b/c", tmp_path / "missing"):
        with pytest.raises(ACEHubError, match="neither an existing local folder .* nor a valid"):
            resolve_adapter_dir(bad)
    assert hub_server.server.requests.maxlen and not any("/definitely" in r[1] for r in hub_server.server.requests)

    folder = make_fake_adapter(tmp_path / "local")
    assert resolve_adapter_dir(folder) == folder
    assert resolve_adapter_dir(str(folder), revision="ignored-for-folders") == folder
    assert resolve_adapter_dir(folder / CONFIG_NAME) == folder
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ACEAdapterFormatError, match=r"no ace_adapter\.safetensors"):
        resolve_adapter_dir(folder)
    with pytest.raises(ACEHubError, match="has no subfolder 'x'"):
        resolve_adapter_dir(folder, subfolder="x")
    with pytest.raises(ACEValueError, match=r"\.\."):
        resolve_adapter_dir(folder, subfolder="../escape")


# ------------------------------------------------------------------------------ ACEAdapter end to end
def test_ace_adapter_push_to_hub_then_from_pretrained_is_bit_exact(hub_server, tmp_path):
    adapter = small_adapter(seed=3, concepts=("Van Gogh", "Monet"))
    image = tmp_path / "before_after.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    repo = hub_server.repo_id("ace-e2e")
    url = adapter.push_to_hub(
        repo, token=hub_server.token, eval_markdown="| Acc_e | 0.01 |\n|---|---|", image_path=image
    )
    assert f"/{repo}/commit/" in url
    loaded = ACEAdapter.from_pretrained(repo)
    assert_same_adapter(adapter, loaded)
    card = ModelCard.load(repo)
    assert card.data.erased_concepts == ["Van Gogh", "Monet"] and card.data.base_model == "tiny/sd"
    assert "](before_after.png)" in card.text and "| Acc_e | 0.01 |" in card.text
    assert "before_after.png" in HfApi().list_repo_files(repo)

    # a new version on main; the old one stays reachable by tag, and offline from the cache
    HfApi(token=hub_server.token).create_tag(repo, tag="v1")
    adapter2 = small_adapter(seed=4, concepts=("Van Gogh", "Monet"))
    adapter2.push_to_hub(repo, token=hub_server.token)
    assert_same_adapter(adapter2, ACEAdapter.from_pretrained(repo))
    assert_same_adapter(adapter, ACEAdapter.from_pretrained(repo, revision="v1"))
    hub_server.set_offline(True)
    assert_same_adapter(adapter, ACEAdapter.from_pretrained(repo, revision="v1"))
    assert_same_adapter(adapter2, ACEAdapter.from_pretrained(repo))


def test_private_ace_adapter_end_to_end(hub_server):
    adapter = small_adapter(seed=5)
    repo = hub_server.repo_id("ace-private")
    adapter.push_to_hub(repo, token=hub_server.token, private=True)
    with pytest.raises(ACEHubError, match="hf auth login"):
        ACEAdapter.from_pretrained(repo)
    assert_same_adapter(adapter, ACEAdapter.from_pretrained(repo, token=hub_server.token))


def test_pipeline_loads_adapter_from_the_hub(hub_server):
    from ace_diffusers.pipeline import get_adapter
    from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    adapter = random_adapter(pipe.unet, seed=1, concepts=("cat",))
    repo = hub_server.repo_id("tiny-sd-cat")
    adapter.push_to_hub(repo, token=hub_server.token)
    name = pipe.load_ace_adapter(repo)
    assert_same_adapter(adapter, get_adapter(pipe, name))


def test_pipeline_pushes_an_erased_concept_and_another_pipeline_loads_it(hub_server):
    from ace_diffusers.pipeline import get_adapter
    from ace_diffusers.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg")
    repo = hub_server.repo_id("erase-van-gogh")
    pipe.push_ace_adapter(repo, "vg", token=hub_server.token)
    card = ModelCard.load(repo)
    assert "Van Gogh" in card.text and card.data.library_name == "ace-diffusers"
    other = tiny_sd_pipeline(seed=0)
    name = other.load_ace_adapter(repo)
    assert_same_adapter(get_adapter(pipe, "vg"), get_adapter(other, name))
