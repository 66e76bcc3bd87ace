"""Hugging Face Hub I/O for ACE adapters: find/download, model cards, publishing.

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

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_token,
    hf_hub_download,
)
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
from huggingface_hub.utils import validate_repo_id

from .adapter import CONFIG_NAME, WEIGHTS_NAME, read_config
from .errors import ACEAdapterFormatError, ACEHubError, ACEValueError

__all__ = [
    "CONFIG_NAME",
    "IMAGE_SUFFIXES",
    "LIBRARY_NAME",
    "REPO_ID_PLACEHOLDER",
    "WEIGHTS_NAME",
    "build_model_card",
    "push_adapter_folder",
    "resolve_adapter_dir",
]

LIBRARY_NAME = "ace-diffusers"
#: Written into the usage snippet of a card built without a repo id; ``push_adapter_folder``
#: replaces it with the repo the card is pushed to.
REPO_ID_PLACEHOLDER = "<repo_id>"
#: Files with these suffixes found in an adapter folder are published along with it (e.g. a
#: before/after grid referenced by the model card).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
MAX_IMAGES = 32
BASE_TAGS = ("concept-erasure", "ace", "diffusers", "stable-diffusion")
_ADAPTER_FILES_HINT = (
    f"ACE adapters contain {CONFIG_NAME} and {WEIGHTS_NAME} (written by ACEAdapter.save_pretrained() "
    "or ACEAdapter.push_to_hub())"
)
_LOGIN_HINT = "pass token=... or run `hf auth login`"
_SHA_RE = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------------------------- download
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
    sub = _clean_subfolder(subfolder)
    local = Path(src).expanduser()
    if local.is_dir():
        return _check_local_folder(local / sub, parent=local) if sub else _check_local_folder(local)
    if local.is_file() and local.name in (CONFIG_NAME, WEIGHTS_NAME) and not sub:
        return _check_local_folder(local.parent)
    if local.exists():
        raise ACEAdapterFormatError(
            f"'{src}' is a file, not an adapter folder. Pass the folder that contains {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}."
        )

    repo_id = os.fspath(src)
    if not isinstance(src, str) or not _is_repo_id(repo_id):
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
        "library_version": _version(),
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
    if weights_path.parent != config_path.parent:  # only without a standard cache layout
        raise ACEHubError(
            f"ACE adapter '{repo_id}' changed while it was being downloaded ({CONFIG_NAME} and "
            f"{WEIGHTS_NAME} come from different commits). Retry, or pin revision= to a commit sha."
        )
    return config_path.parent


def _check_local_folder(folder: Path, *, parent: Path | None = None) -> Path:
    """``folder`` must hold both adapter files; ``parent`` is the folder given when ``subfolder`` was used."""
    if not folder.is_dir():
        if parent is not None:
            raise ACEHubError(
                f"'{parent}' is a local folder but has no subfolder '{folder.relative_to(parent)}': check subfolder=."
            )
        raise ACEValueError(f"'{folder}' does not exist or is not a folder; pass the adapter folder.")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise ACEAdapterFormatError(
            f"'{folder}' is not an ACE adapter folder: it has no {' and no '.join(missing)}. "
            f"{_ADAPTER_FILES_HINT}."
        )
    return folder


def _clean_subfolder(subfolder: str | None) -> str:
    if not subfolder:
        return ""
    parts = PurePosixPath(str(subfolder).replace("\\", "/")).parts
    parts = tuple(p for p in parts if p not in ("", "/", "."))
    if any(p == ".." for p in parts):
        raise ACEValueError(f"subfolder={subfolder!r} must stay inside the adapter folder/repo (no '..').")
    return "/".join(parts)


def _is_repo_id(value: str) -> bool:
    if value.startswith((".", "/", "~")) or "\\" in value or os.path.isabs(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _snapshot_commit(path: Path, sub: str) -> str | None:
    """The commit sha of the cache snapshot ``path`` lives in (``.../snapshots/<sha>/<sub>/file``)."""
    depth = len(PurePosixPath(sub).parts) if sub else 0
    try:
        snapshot = path.parents[depth]
    except IndexError:
        return None
    if snapshot.parent.name == "snapshots" and _SHA_RE.fullmatch(snapshot.name):
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
        return _token_available(self.token)


def _download_error(err: Exception, ctx: _Ctx, filename: str) -> Exception:
    endpoint = constants.ENDPOINT
    repo = ctx.repo_id
    if isinstance(err, GatedRepoError):
        return ACEHubError(
            f"ACE adapter repo {ctx.where} is gated: request access on {endpoint}/{repo}, then {_LOGIN_HINT} "
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
            f"private repo {_LOGIN_HINT} with an account that can read it."
        )
    if isinstance(err, RevisionNotFoundError):
        return ACEHubError(
            f"Revision '{ctx.revision}' does not exist in ACE adapter repo '{repo}': pass an existing branch, "
            f"tag or full commit sha (list them with `huggingface_hub.list_repo_refs('{repo}')`), or omit "
            "revision= to use the main branch."
        )
    if isinstance(err, LocalEntryNotFoundError):
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
            f"Could not reach the Hugging Face Hub at {endpoint} to download ACE adapter {ctx.where}{detail}, "
            "and it is not in the local cache. Check your network/proxy settings (and HF_ENDPOINT), then retry; "
            "to use a cached copy explicitly, pass local_files_only=True."
        )
    if isinstance(err, EntryNotFoundError):  # remote: the repo exists, the file does not
        where = f" in subfolder '{ctx.sub}'" if ctx.sub else ""
        listing = _list_files_hint(ctx)
        return ACEAdapterFormatError(
            f"Repo {ctx.where} is not an ACE adapter: it has no {filename}{where}. {_ADAPTER_FILES_HINT}."
            f"{listing} If the adapter lives in a folder of the repo, pass subfolder=..."
        )
    if isinstance(err, HfHubHTTPError):
        return _http_error(err, f"downloading ACE adapter {ctx.where}", sent_token=ctx.sent_token)
    if isinstance(err, HFValidationError):
        return ACEHubError(f"Invalid argument while downloading ACE adapter {ctx.where}: {err}")
    if isinstance(err, (OfflineModeIsEnabled, OSError)) or _is_network_error(err):
        return ACEHubError(f"Downloading ACE adapter {ctx.where} from {endpoint} failed: {err}")
    return err  # a bug or an unexpected condition: do not hide it behind a friendly message


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


# ---------------------------------------------------------------------------------- model card
def build_model_card(
    config: Mapping[str, Any],
    *,
    eval_markdown: str | None = None,
    image_relpath: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Build the Hub model card (``README.md``) for an adapter from its ``ace_config.json`` content.

    Args:
        config: the adapter config (``ACEAdapter.config``): concepts, neutral anchors, kind, rank,
            method, fit settings, base model, fingerprint, version.
        eval_markdown: a Markdown evaluation table/report to include verbatim.
        image_relpath: path, relative to the repo root, of a sample image to show.
        repo_id: the repo the card is for, used in the usage snippet; when ``None`` the snippet holds
            :data:`REPO_ID_PLACEHOLDER`, which :func:`push_adapter_folder` fills in.

    The metadata has ``library_name: ace-diffusers``, ``base_model`` (with
    ``base_model_relation: adapter``; only when the config's base model is a Hub model id, since the
    Hub rejects local paths there), discovery tags and machine-readable ``erased_concepts`` /
    ``neutral_anchors``.
    """
    concepts = [str(c) for c in config.get("concepts") or []]
    neutral = [str(n) for n in config.get("neutral") or []]
    kind = config.get("kind")
    base_model = _hub_model_id(config.get("base_model"))
    tags = list(BASE_TAGS)
    if kind and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", str(kind)):
        tags.append(f"concept-erasure-{str(kind).lower()}")
    if base_model and "xl" in str(base_model).lower():
        tags.append("stable-diffusion-xl")
    extra: dict[str, Any] = {"erased_concepts": concepts}
    if neutral:
        extra["neutral_anchors"] = neutral
    if base_model:
        extra["base_model_relation"] = "adapter"
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base_model, tags=tags, **extra)
    text = _card_text(config, concepts, neutral, repo_id or REPO_ID_PLACEHOLDER, eval_markdown, image_relpath)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _hub_model_id(value: Any) -> str | None:
    """``value`` if it looks like a Hub model id (not a local path), else ``None``."""
    if not isinstance(value, str) or not value or not _is_repo_id(value) or Path(value).expanduser().exists():
        return None
    return value


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = " ".join(text.split())
    if len(text) > 160:
        text = text[:157] + "..."
    return text.replace("|", "\\|") or " "


def _card_text(
    config: Mapping[str, Any],
    concepts: list[str],
    neutral: list[str],
    repo_id: str,
    eval_markdown: str | None,
    image_relpath: str | None,
) -> str:
    kind = config.get("kind")
    base_model = config.get("base_model")
    hub_base = _hub_model_id(base_model)
    title = ", ".join(concepts[:5]) + (f" and {len(concepts) - 5} more" if len(concepts) > 5 else "")
    lines = [
        f"# ACE concept-erasure adapter: {title or 'no concepts'}",
        "",
        "An [ACE](https://arxiv.org/abs/2504.11850) (Attentional Concept Erasure) adapter for 🧨 diffusers, made "
        "with `ace-diffusers`. It edits the cross-attention key/value projections with a *gated* low-rank "
        "delta: prompts that mention an erased concept are steered to its neutral anchor, while the gate "
        "leaves unrelated prompts untouched. It is not a standalone model: load it on top of "
        + (
            f"[`{hub_base}`](https://huggingface.co/{hub_base})."
            if hub_base
            else (f"`{base_model}`." if base_model else "its base pipeline.")
        ),
        "",
        "## Erased concepts",
        "",
    ]
    if neutral and len(neutral) == len(concepts):
        lines += ["| Erased concept | Neutral anchor |", "|---|---|"]
        lines += [f"| {_cell(c)} | {_cell(n) if n else '(empty prompt)'} |" for c, n in zip(concepts, neutral, strict=True)]
    else:
        lines += [f"- {_cell(c)}" for c in concepts] or ["(none)"]
        if neutral:
            lines += ["", "Neutral anchors: " + ", ".join(_cell(n) for n in neutral)]
    fingerprint = config.get("fingerprint") or {}
    n_layers = len(fingerprint.get("layers") or {}) if isinstance(fingerprint, Mapping) else 0
    details = [
        ("Kind", kind or "unspecified"),
        ("Rank", config.get("rank")),
        ("Method", config.get("method")),
        ("Base model", base_model or "unspecified"),
        ("Cross-attention layers", n_layers or None),
        ("Architecture hash", fingerprint.get("hash") if isinstance(fingerprint, Mapping) else None),
        ("Format version", config.get("format_version")),
        ("Created with", config.get("created_with")),
    ]
    lines += ["", "## Adapter", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in details if v is not None]
    fit = config.get("fit") or {}
    if isinstance(fit, Mapping) and fit:
        lines += ["", "### Fit settings", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {_cell(str(k))} | {_cell(v)} |" for k, v in fit.items()]
    example = json.dumps(f"a photo of {concepts[0]}" if concepts else "a photo", ensure_ascii=False)
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        "import ace_diffusers  # adds load_ace_adapter() and friends to diffusers pipelines",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_model or "<base-model-id>"}")',
        f'pipe.load_ace_adapter("{repo_id}")',
        f"image = pipe({example}).images[0]",
        "```",
        "",
        "The adapter alone (no pipeline): "
        f'`ace_diffusers.ACEAdapter.from_pretrained("{repo_id}")`. Files: `{CONFIG_NAME}` (settings, JSON) '
        f"and `{WEIGHTS_NAME}` (tensors, safetensors): loading never executes code.",
    ]
    if eval_markdown and eval_markdown.strip():
        lines += ["", "## Evaluation", "", eval_markdown.strip()]
    if image_relpath:
        lines += ["", "## Samples", "", f"![Samples with and without the adapter]({quote(image_relpath)})"]
    lines += [
        "",
        "## Limitations",
        "",
        "Erasure lowers the chance that the concepts appear; it is not a guarantee. Unlisted synonyms, "
        "paraphrases or adversarial prompts may still evoke them, and nearby concepts may change slightly. "
        "Evaluate on your own prompts before relying on it as a safety component.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- publish
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
    ``ace_config.json``, ``ace_adapter.safetensors``, ``README.md`` and any images in the folder
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
    _check_local_folder(folder)
    config = read_config(folder / CONFIG_NAME)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ACEValueError(f"repo_id={repo_id!r} is not a valid Hub repo id ('namespace/name'): {err}") from err
    if revision is not None and _SHA_RE.fullmatch(revision):
        raise ACEValueError(
            f"revision={revision!r} is a commit sha; commits are immutable. Push to a branch (e.g. 'main' or a "
            "new branch name) instead."
        )
    if constants.is_offline_mode():
        raise ACEHubError(
            f"Cannot push ACE adapter to '{repo_id}': offline mode is on (HF_HUB_OFFLINE=1). Set HF_HUB_OFFLINE=0 "
            "(or unset it) to publish."
        )
    if not _token_available(token):
        raise ACEHubError(
            f"Pushing to '{repo_id}' needs a Hugging Face token with write access and none was found: "
            f"{_LOGIN_HINT} (or set HF_TOKEN)."
        )

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_version())
    stage = "creating the repo"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/pr/"):
            stage = f"preparing branch '{revision}'"
            refs = api.list_repo_refs(repo_id)
            if any(t.name == revision for t in refs.tags):
                raise ACEValueError(
                    f"revision={revision!r} is a tag of '{repo_id}'; tags are immutable. Push to a branch, then "
                    f"tag it: huggingface_hub.create_tag('{repo_id}', tag=...)."
                )
            if not any(b.name == revision for b in refs.branches):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = "uploading the adapter"
        operations = _commit_operations(folder, repo_id, config, model_card)
        message = commit_message or f"Upload ACE adapter erasing {', '.join(config['concepts'][:5]) or 'nothing'}"
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
    ]
    images = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_symlink()
    )
    if len(images) > MAX_IMAGES:
        raise ACEAdapterFormatError(
            f"'{folder}' holds {len(images)} images; at most {MAX_IMAGES} are published with an adapter. Move "
            "the extra images out of the folder."
        )
    ops += [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in images]
    return ops


def _push_error(err: Exception, repo_id: str, revision: str | None, stage: str) -> Exception:
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your user"
    if isinstance(err, RepositoryNotFoundError):
        return ACEHubError(
            f"Cannot push to '{repo_id}' ({stage}): the Hub reports the repo as missing or not visible to your "
            f"token. Check the repo id, and that the token belongs to an account with write access to "
            f"'{namespace}' ({_LOGIN_HINT})."
        )
    if isinstance(err, RevisionNotFoundError):
        return ACEHubError(
            f"Cannot push to '{repo_id}': branch '{revision}' does not exist ({stage}). Create it with "
            f"huggingface_hub.create_branch('{repo_id}', branch='{revision}') or omit revision=."
        )
    if isinstance(err, HfHubHTTPError):
        return _http_error(err, f"pushing to '{repo_id}' ({stage})", sent_token=True, write_to=namespace)
    if isinstance(err, ValueError) and "README.md" in str(err):
        return ACEHubError(f"The Hub rejected the model card of '{repo_id}': {err}")
    if isinstance(err, (OfflineModeIsEnabled, OSError)) or _is_network_error(err):
        return ACEHubError(
            f"Pushing to '{repo_id}' failed while {stage}: could not talk to the Hub at {constants.ENDPOINT} "
            f"({type(err).__name__}: {err}). Check your network/proxy settings and HF_ENDPOINT, then retry."
        )
    return err


# ---------------------------------------------------------------------------------- helpers
def _http_error(err: HfHubHTTPError, doing: str, *, sent_token: bool, write_to: str | None = None) -> ACEHubError:
    """Translate an HTTP error; ``write_to`` is the namespace a push targets (``None`` for downloads)."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    server = " ".join((getattr(err, "server_message", None) or "").split())
    if server and server[-1] not in ".!?":
        server += "."
    server = f" The Hub said: {server}" if server else ""
    if status == 401:
        if sent_token:
            return ACEHubError(
                f"The Hub rejected the token while {doing} (401 Unauthorized): it is invalid or expired. "
                f"Pass a valid token=... or run `hf auth login` again (HF_TOKEN, if set, takes precedence over "
                "a stored login)."
            )
        return ACEHubError(f"The Hub requires authentication for {doing} (401 Unauthorized): {_LOGIN_HINT}.")
    if status == 403:
        if write_to is not None:
            fix = f"Use a token with the 'write' role whose account can write to '{write_to}'"
        else:
            fix = "Use a token whose account has access to the repo"
        return ACEHubError(f"The Hub refused {doing} (403 Forbidden).{server} {fix} ({_LOGIN_HINT}).")
    if status == 412:
        return ACEHubError(f"The branch moved while {doing} (412 Precondition Failed): retry.")
    return ACEHubError(
        f"The Hub answered HTTP {status} while {doing}.{server} Retry later; if it persists, check HF_ENDPOINT "
        f"({constants.ENDPOINT})."
    )


def _token_available(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str):
        return bool(token)
    return get_token() is not None


def _is_network_error(err: BaseException) -> bool:
    module = type(err).__module__.split(".")[0]
    transports = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
    return isinstance(err, (ConnectionError, TimeoutError)) or module in transports


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover - partially installed package
        return "unknown"
