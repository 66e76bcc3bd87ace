"""Publishing an adapter folder to the Hub in one commit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ..format import CONFIG_NAME, WEIGHTS_NAME, read_config
from ..version import __version__
from .card import REPO_ID_PLACEHOLDER, build_model_card
from .common import (
    COUNT_FILE,
    LIBRARY_NAME,
    LOGIN_HINT,
    SHA_RE,
    check_local_folder,
    count_file_content,
    http_error,
    is_network_error,
    token_available,
)

#: Files with these suffixes found in an adapter folder are published along with it (e.g. a
#: before/after grid referenced by the model card).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
MAX_IMAGES = 32


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    model_card: ModelCard | None = None,
) -> str:
    """Publish an adapter folder to ``repo_id`` in a single commit; return the commit (or PR) URL.

    Creates the repo if needed (``private`` applies only to a new repo), creates ``revision`` as a
    branch from ``main`` when it names a branch that does not exist yet, and commits
    ``ace_config.json``, ``ace_adapter.safetensors``, ``README.md``, the download-count file
    ``config.json`` (:data:`~ace_diffusers.hub.common.COUNT_FILE`) and any images in the folder
    (:data:`IMAGE_SUFFIXES`). The README is ``model_card`` if given, else the folder's own
    ``README.md``, else a card built from the config; a :data:`REPO_ID_PLACEHOLDER` in it is replaced
    by the repo id. The folder itself is not modified. With ``create_pr=True`` the commit opens a
    pull request against ``revision`` (default ``main``) and the PR URL is returned.

    Raises:
        ACEAdapterFormatError: the folder is not a valid adapter folder.
        ACEValueError: ``repo_id`` is malformed or ``revision`` is a tag/commit (immutable).
        ACEHubError: no/invalid/read-only token, no write access, offline mode, network failure.
    """
    folder = Path(folder)
    check_local_folder(folder)
    config = read_config(folder / CONFIG_NAME)
    _check_push(repo_id, revision, token)
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    stage = "creating the repo"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/pr/"):
            stage = f"preparing branch '{revision}'"
            refs = api.list_repo_refs(repo_id)
            if any(t.name == revision for t in refs.tags):
                raise ACEValueError(
                    f"revision={revision!r} is a tag of '{repo_id}'; tags are immutable. Push to a branch, "
                    f"then "
                    f"tag it: huggingface_hub.create_tag('{repo_id}', tag=...)."
                )
            if not any(b.name == revision for b in refs.branches):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = "uploading the adapter"
        operations = _commit_operations(folder, repo_id, config, model_card)
        message = (
            commit_message or f"Upload ACE adapter erasing {', '.join(config['concepts'][:5]) or 'nothing'}"
        )
        info = api.create_commit(
            repo_id, operations=operations, commit_message=message, revision=revision, create_pr=create_pr
        )
    except (ACEValueError, ACEAdapterFormatError):
        raise
    except Exception as err:
        raise _push_error(err, repo_id, revision, stage) from err
    if create_pr and info.pr_url:
        return str(info.pr_url)
    return str(info.commit_url)


def _check_push(repo_id: str, revision: str | None, token: str | None) -> None:
    """Refuse, before any network traffic, a push that cannot work."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ACEValueError(
            f"repo_id={repo_id!r} is not a valid Hub repo id ('namespace/name'): {err}"
        ) from err
    if revision is not None and SHA_RE.fullmatch(revision):
        raise ACEValueError(
            f"revision={revision!r} is a commit sha; commits are immutable. Push to a branch (e.g. 'main' or "
            f"a "
            "new branch name) instead."
        )
    if constants.is_offline_mode():
        raise ACEHubError(
            f"Cannot push ACE adapter to '{repo_id}': offline mode is on (HF_HUB_OFFLINE=1). Set "
            f"HF_HUB_OFFLINE=0 "
            "(or unset it) to publish."
        )
    if not token_available(token):
        raise ACEHubError(
            f"Pushing to '{repo_id}' needs a Hugging Face token with write access and none was found: "
            f"{LOGIN_HINT} (or set HF_TOKEN)."
        )


def _commit_operations(
    folder: Path, repo_id: str, config: Mapping[str, Any], model_card: ModelCard | None
) -> list[CommitOperationAdd]:
    if model_card is not None:
        readme = str(model_card)
    elif (folder / "README.md").is_file():
        readme = (folder / "README.md").read_text(encoding="utf-8")
    else:
        readme = str(build_model_card(config))
    readme = readme.replace(REPO_ID_PLACEHOLDER, repo_id)
    ops = [
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=str(folder / CONFIG_NAME)),
        CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=str(folder / WEIGHTS_NAME)),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")),
        CommitOperationAdd(path_in_repo=COUNT_FILE, path_or_fileobj=count_file_content(dict(config))),
    ]
    images = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_symlink()
    )
    if len(images) > MAX_IMAGES:
        raise ACEAdapterFormatError(
            f"'{folder}' holds {len(images)} images; at most {MAX_IMAGES} are published with an adapter. "
            "Move "
            "the extra images out of the folder."
        )
    ops += [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in images
    ]
    return ops


def _push_error(err: Exception, repo_id: str, revision: str | None, stage: str) -> Exception:
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your user"
    if isinstance(err, RepositoryNotFoundError):
        return ACEHubError(
            f"Cannot push to '{repo_id}' ({stage}): the Hub reports the repo as missing or not visible to "
            f"your "
            f"token. Check the repo id, and that the token belongs to an account with write access to "
            f"'{namespace}' ({LOGIN_HINT})."
        )
    if isinstance(err, RevisionNotFoundError):
        return ACEHubError(
            f"Cannot push to '{repo_id}': branch '{revision}' does not exist ({stage}). Create it with "
            f"huggingface_hub.create_branch('{repo_id}', branch='{revision}') or omit revision=."
        )
    if isinstance(err, HfHubHTTPError):
        return http_error(err, f"pushing to '{repo_id}' ({stage})", sent_token=True, write_to=namespace)
    if isinstance(err, ValueError) and "README.md" in str(err):
        return ACEHubError(f"The Hub rejected the model card of '{repo_id}': {err}")
    if isinstance(err, (OfflineModeIsEnabled, OSError)) or is_network_error(err):
        return ACEHubError(
            f"Pushing to '{repo_id}' failed while {stage}: could not talk to the Hub at {constants.ENDPOINT} "
            f"({type(err).__name__}: {err}). Check your network/proxy settings and HF_ENDPOINT, then retry."
        )
    return err
