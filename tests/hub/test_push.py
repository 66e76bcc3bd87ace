"""Hub I/O against a local Hub-protocol server, driven by the *real* ``huggingface_hub`` client.

Nothing of ours is mocked: ``push_adapter_folder``/``resolve_adapter_dir``/``ACEAdapter`` talk HTTP
to ``tests/hub_server.py`` on 127.0.0.1, through the genuine client, its cache and offline logic.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ace_diffusers.hub.download import resolve_adapter_dir
from ace_diffusers.hub.push import push_adapter_folder

from ..hub_server import configure_client
from .conftest import files_of, make_fake_adapter, small_adapter


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
    assert [c.title for c in api.list_repo_commits(repo, revision="dev")][
        0
    ] == "Upload a.txt with huggingface_hub"
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


def test_create_pr(hub_server, tmp_path):
    repo = hub_server.repo_id("pr")
    base, proposal = make_fake_adapter(tmp_path / "b", seed=1), make_fake_adapter(tmp_path / "p", seed=2)
    push_adapter_folder(base, repo, token=hub_server.token)
    url = push_adapter_folder(proposal, repo, token=hub_server.token, create_pr=True)
    assert url == f"{hub_server.endpoint}/{repo}/discussions/1"
    assert files_of(resolve_adapter_dir(repo)) == files_of(base)
    assert files_of(resolve_adapter_dir(repo, revision="refs/pr/1")) == files_of(proposal)


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
    assert push_adapter_folder(folder, org_repo, token=hub_server.token).startswith(
        f"{hub_server.endpoint}/{org_repo}"
    )
    hub_server.set_offline(True)
    with pytest.raises(ACEHubError, match=r"offline mode is on.*HF_HUB_OFFLINE=0"):
        push_adapter_folder(folder, repo, token=hub_server.token)


# ------------------------------------------------------------------------------ offline / cache


# ------------------------------------------------------------------------------ not an adapter / bad input


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
