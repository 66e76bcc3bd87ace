"""Downloading adapters through the real huggingface_hub client from the local Hub-protocol server: pinning,
subfolders, gated and private repos, offline mode and every error a user can meet."""

from __future__ import annotations

import json
import socket
import time
import types

import pytest
from huggingface_hub import HfApi, constants

from ace_diffusers.errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ace_diffusers.hub import CONFIG_NAME, WEIGHTS_NAME
from ace_diffusers.hub.download import resolve_adapter_dir
from ace_diffusers.hub.push import push_adapter_folder

from .conftest import CONFIG, files_of, make_fake_adapter


def test_push_then_download_by_repo_id_is_byte_identical(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "adapter")
    repo = hub_server.repo_id("van-gogh")
    url = push_adapter_folder(folder, repo, token=hub_server.token)
    assert url.startswith(f"{hub_server.endpoint}/{repo}/commit/")
    assert sorted(HfApi().list_repo_files(repo)) == sorted(
        [".gitattributes", "README.md", "config.json", CONFIG_NAME, WEIGHTS_NAME]
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME]
    )  # the folder is untouched

    got = resolve_adapter_dir(repo)  # public repo: no token needed
    assert files_of(got) == files_of(folder)
    assert got.parent.name == "snapshots" and got.name == url.rsplit("/", 1)[1]  # both files of one commit
    assert str(got).startswith(str(hub_server.cache_dir))
    other_cache = tmp_path / "other-cache"
    assert files_of(resolve_adapter_dir(repo, cache_dir=other_cache)) == files_of(folder)
    assert str(resolve_adapter_dir(repo, cache_dir=other_cache)).startswith(str(other_cache))


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


def test_gated_repo(hub_server, tmp_path):
    repo = hub_server.repo_id("gated")
    push_adapter_folder(make_fake_adapter(tmp_path / "a"), repo, token=hub_server.token)
    hub_server.server.set_gated(repo)
    with pytest.raises(ACEHubError, match=r"is gated: request access"):
        resolve_adapter_dir(repo, token=hub_server.server.other_token)


def test_offline_uses_the_cache_and_explains_misses(hub_server, tmp_path):
    folder = make_fake_adapter(tmp_path / "a")
    repo = hub_server.repo_id("cached")
    push_adapter_folder(folder, repo, token=hub_server.token)
    push_adapter_folder(
        make_fake_adapter(tmp_path / "other"), hub_server.repo_id("never"), token=hub_server.token
    )
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
    with pytest.raises(
        ACEHubError, match=r"(?s)never downloaded.*local_files_only=True.*local_files_only=False"
    ):
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
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    with pytest.raises(ACEHubError, match=r"Could not reach the Hugging Face Hub at http://127\.0\.0\.1"):
        resolve_adapter_dir("someone/anything")


def test_repo_that_is_not_an_ace_adapter(hub_server, tmp_path):
    api = HfApi(token=hub_server.token)
    repo = hub_server.repo_id("a-lora")
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="adapter_config.json", repo_id=repo)
    with pytest.raises(
        ACEAdapterFormatError,
        match=r"(?s)'ace-tester/a-lora' is not an ACE adapter: it has no ace_config\.json"
        r".*ACE adapters contain"
        r".*It contains: adapter_config\.json",
    ):
        resolve_adapter_dir(repo)

    half = hub_server.repo_id("half")
    api.create_repo(half)
    api.upload_file(path_or_fileobj=json.dumps(CONFIG).encode(), path_in_repo=CONFIG_NAME, repo_id=half)
    with pytest.raises(ACEAdapterFormatError, match=r"no ace_adapter\.safetensors"):
        resolve_adapter_dir(half)


def test_missing_repo_and_bad_paths(hub_server, tmp_path, monkeypatch):
    with pytest.raises(
        ACEHubError, match=r"(?s)Could not find ACE adapter repo 'ace-tester/nothing-here'.*no local folder"
    ):
        resolve_adapter_dir("ace-tester/nothing-here")
    monkeypatch.chdir(tmp_path)
    for bad in ("./adapters/mine", "/definitely/not/here", "a/b/c", tmp_path / "missing"):
        with pytest.raises(ACEHubError, match="neither an existing local folder .* nor a valid"):
            resolve_adapter_dir(bad)
    assert hub_server.server.requests.maxlen and not any(
        "/definitely" in r[1] for r in hub_server.server.requests
    )

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
