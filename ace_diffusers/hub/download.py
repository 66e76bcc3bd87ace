"""Hugging Face Hub downloads of ACE adapters (model cards: :mod:`.card`; publishing: :mod:`.push`).

An ACE adapter on the Hub is an ordinary model repo holding the two files written by
:meth:`ACEAdapter.save_pretrained` (``ace_adapter.safetensors`` + ``ace_config.json``), a
``README.md`` model card (``library_name: ace-diffusers``) and optionally sample images.

Everything goes through the public ``huggingface_hub`` API, so the usual machinery applies
unchanged: ``HF_ENDPOINT``, ``HF_TOKEN`` / ``hf auth login``, the shared cache (``HF_HUB_CACHE``),
offline mode (``HF_HUB_OFFLINE=1``) and ``local_files_only=True``. Failures are translated into
:class:`~ace_diffusers.errors.ACEHubError` (network, auth, missing repo/revision, offline cache
misses) or :class:`~ace_diffusers.errors.ACEAdapterFormatError` (the repo is reachable but is not an
ACE adapter), each message naming the repo/revision and the fix. The original ``huggingface_hub``
exception stays available as ``__cause__``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ..format import CONFIG_NAME, WEIGHTS_NAME
from ..version import __version__
from .common import (
    ADAPTER_FILES_HINT,
    COUNT_FILE,
    LIBRARY_NAME,
    LOGIN_HINT,
    SHA_RE,
    check_local_folder,
    http_error,
    is_network_error,
    is_repo_id,
    token_available,
)


def resolve_adapter_dir(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local folder holding ``ace_config.json`` and ``ace_adapter.safetensors``.

    Args:
        src: a local adapter folder, or a Hub repo id (``"namespace/name"``).
        revision: branch, tag or full commit sha to download (Hub only; default: the main branch).
        subfolder: folder inside ``src`` / the repo that holds the two files.
        cache_dir: Hugging Face cache to use instead of ``HF_HUB_CACHE``.
        token: Hub token (``None``: the stored login / ``HF_TOKEN``; ``False``: send none).
        local_files_only: only look in the local cache, never contact the Hub.

    For a local folder, ``revision``/``cache_dir``/``token`` are ignored and the folder is returned
    as is (after checking both files exist). For a repo id both files are downloaded from the same
    commit into the cache and their snapshot folder is returned. In offline mode
    (``HF_HUB_OFFLINE=1``) or with ``local_files_only=True`` the cache alone is used.

    Raises:
        ACEAdapterFormatError: the folder/repo exists but lacks one of the two files.
        ACEHubError: the repo, revision or token is wrong, the Hub is unreachable, the adapter was
            never downloaded while offline, or ``src`` is neither a folder nor a valid repo id.
    """
    sub = clean_subfolder(subfolder)
    local = Path(src).expanduser()
    if local.is_dir():
        return check_local_folder(local / sub, parent=local) if sub else check_local_folder(local)
    if local.is_file() and local.name in (CONFIG_NAME, WEIGHTS_NAME) and not sub:
        return check_local_folder(local.parent)
    if local.exists():
        raise ACEAdapterFormatError(
            f"'{src}' is a file, not an adapter folder. Pass the folder that contains {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}."
        )

    repo_id = os.fspath(src)
    if not isinstance(src, str) or not is_repo_id(repo_id):
        raise ACEHubError(
            f"'{repo_id}' is neither an existing local folder (looked for '{local.absolute()}') nor a valid "
            "Hugging Face Hub repo id ('namespace/name'). Check the path for typos, or pass a repo id."
        )

    common: dict[str, Any] = {
        "repo_type": "model",
        "subfolder": sub or None,
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
        "library_name": LIBRARY_NAME,
        "library_version": __version__,
    }
    ctx = _Ctx(repo_id, revision, sub, token, local_files_only, cache_dir, local.absolute())
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **common))
    except Exception as err:
        raise _download_error(err, ctx, CONFIG_NAME) from err
    # pin the weights to the commit the config came from, so a concurrent push cannot mix versions
    commit = _snapshot_commit(config_path, sub)
    try:
        weights_path = Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=commit or revision, **common))
    except Exception as err:
        raise _download_error(err, ctx, WEIGHTS_NAME) from err
    _touch_count_file(repo_id, commit or revision, common)
    if weights_path.parent != config_path.parent:  # only without a standard cache layout
        raise ACEHubError(
            f"ACE adapter '{repo_id}' changed while it was being downloaded ({CONFIG_NAME} and "
            f"{WEIGHTS_NAME} come from different commits). Retry, or pin revision= to a commit sha."
        )
    return config_path.parent


def _touch_count_file(repo_id: str, revision: str | None, common: dict[str, Any]) -> None:
    """Fetch the repo's download-count file (:data:`COUNT_FILE`), so the Hub counts this load; a repo
    without it (pushed by an older version, or by hand), offline mode or any failure changes nothing."""
    try:
        hf_hub_download(repo_id, COUNT_FILE, revision=revision, **common)
    except Exception:  # noqa: BLE001 - best effort: loading never depends on the counter
        return


def clean_subfolder(subfolder: str | os.PathLike | None) -> str:
    """``subfolder`` as a relative POSIX path inside the folder / repo, or a typed error when it would
    leave it (``..``, an absolute path, a drive letter) — checked before anything is joined or fetched."""
    if not subfolder:
        return ""
    text = str(subfolder).replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ACEValueError(
            f"subfolder={subfolder!r} is absolute; pass a folder relative to the adapter folder/repo."
        )
    parts = tuple(p for p in PurePosixPath(text).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise ACEValueError(f"subfolder={subfolder!r} must stay inside the adapter folder/repo (no '..').")
    return "/".join(parts)


def _snapshot_commit(path: Path, sub: str) -> str | None:
    """The commit sha of the cache snapshot ``path`` lives in (``.../snapshots/<sha>/<sub>/file``)."""
    depth = len(PurePosixPath(sub).parts) if sub else 0
    try:
        snapshot = path.parents[depth]
    except IndexError:
        return None
    if snapshot.parent.name == "snapshots" and SHA_RE.fullmatch(snapshot.name):
        return snapshot.name
    return None


class _Ctx:
    """What an error message needs to know about the download that failed."""

    def __init__(
        self,
        repo_id: str,
        revision: str | None,
        sub: str,
        token: str | bool | None,
        local_files_only: bool,
        cache_dir: str | os.PathLike | None,
        local_path: Path,
    ) -> None:
        self.local_path = local_path
        self.repo_id = repo_id
        self.revision = revision
        self.sub = sub
        self.token = token
        self.local_files_only = local_files_only
        self.cache_dir = cache_dir

    @property
    def where(self) -> str:
        text = f"'{self.repo_id}'"
        if self.revision:
            text += f" (revision '{self.revision}')"
        if self.sub:
            text += f" (subfolder '{self.sub}')"
        return text

    @property
    def sent_token(self) -> bool:
        return token_available(self.token)


def _download_error(err: Exception, ctx: _Ctx, filename: str) -> Exception:
    endpoint = constants.ENDPOINT
    repo = ctx.repo_id
    if isinstance(err, GatedRepoError):
        return ACEHubError(
            f"ACE adapter repo {ctx.where} is gated: request access on {endpoint}/{repo}, then {LOGIN_HINT} "
            "with the account that was granted access."
        )
    if isinstance(err, RepositoryNotFoundError):
        why = (
            "it is private and the token sent has no access to it"
            if ctx.sent_token
            else "it is private and no token was sent"
        )
        return ACEHubError(
            f"Could not find ACE adapter repo '{repo}' on the Hub ({endpoint}), and there is no local folder "
            f"'{ctx.local_path}' either: the repo id (or path) is wrong, or {why}. Check the repo id; for a "
            f"private repo {LOGIN_HINT} with an account that can read it."
        )
    if isinstance(err, RevisionNotFoundError):
        return ACEHubError(
            f"Revision '{ctx.revision}' does not exist in ACE adapter repo '{repo}': pass an existing "
            "branch, "
            f"tag or full commit sha (list them with `huggingface_hub.list_repo_refs('{repo}')`), or omit "
            "revision= to use the main branch."
        )
    if isinstance(err, LocalEntryNotFoundError):
        return _cache_miss_error(err, ctx, filename)
    if isinstance(err, EntryNotFoundError):  # remote: the repo exists, the file does not
        where = f" in subfolder '{ctx.sub}'" if ctx.sub else ""
        listing = _list_files_hint(ctx)
        return ACEAdapterFormatError(
            f"Repo {ctx.where} is not an ACE adapter: it has no {filename}{where}. {ADAPTER_FILES_HINT}."
            f"{listing} If the adapter lives in a folder of the repo, pass subfolder=..."
        )
    if isinstance(err, HfHubHTTPError):
        return http_error(err, f"downloading ACE adapter {ctx.where}", sent_token=ctx.sent_token)
    if isinstance(err, HFValidationError):
        return ACEHubError(f"Invalid argument while downloading ACE adapter {ctx.where}: {err}")
    if isinstance(err, (OfflineModeIsEnabled, OSError)) or is_network_error(err):
        return ACEHubError(f"Downloading ACE adapter {ctx.where} from {endpoint} failed: {err}")
    return err  # a bug or an unexpected condition: do not hide it behind a friendly message


def _cache_miss_error(err: Exception, ctx: _Ctx, filename: str) -> ACEHubError:
    """Not in the cache: offline (or local files only), or the Hub could not be reached."""
    endpoint = constants.ENDPOINT
    offline = constants.is_offline_mode()
    if ctx.local_files_only or offline:
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "local_files_only=True was passed"
        cache = ctx.cache_dir or constants.HF_HUB_CACHE
        fix = "set HF_HUB_OFFLINE=0 (or unset it)" if offline else "pass local_files_only=False"
        return ACEHubError(
            f"ACE adapter {ctx.where} was never downloaded (no complete copy of {filename} in the cache "
            f"'{cache}') and {reason}, so the Hub cannot be contacted. Run once online to populate the "
            f"cache: {fix}, or pass the path of a local adapter folder instead (there is no local "
            f"folder '{ctx.local_path}')."
        )
    cause = err.__cause__
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:300]})" if cause and str(cause) else ""
    return ACEHubError(
        f"Could not reach the Hugging Face Hub at {endpoint} to download ACE adapter "
        f"{ctx.where}{detail}, "
        "and it is not in the local cache. Check your network/proxy settings (and HF_ENDPOINT), then "
        "retry; "
        "to use a cached copy explicitly, pass local_files_only=True."
    )


def _list_files_hint(ctx: _Ctx) -> str:
    """Best effort: name what the repo holds instead, to make 'not an ACE adapter' concrete."""
    try:
        files = HfApi().list_repo_files(ctx.repo_id, revision=ctx.revision, token=ctx.token)
    except Exception:
        return ""
    shown = [f for f in files if f != ".gitattributes"][:8]
    if not shown:
        return " The repo is empty."
    more = ", ..." if len(files) > len(shown) + 1 else ""
    return f" It contains: {', '.join(shown)}{more}."
