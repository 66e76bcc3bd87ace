"""What the Hub modules share: the library name, hints, repo-id checks and the HTTP error translation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ..format import CONFIG_NAME, WEIGHTS_NAME

LIBRARY_NAME = "ace-diffusers"
# The Hub counts a repo's downloads by requests to its query files; for a library it has no rule for
# (ace-diffusers) that is ``config.json``. Every pushed adapter carries this tiny file and every
# load_ace_adapter() from the Hub fetches it (once per load; a repo without it still loads), so the
# counter shows real use. It names the adapter files; nothing reads it to load an adapter.
COUNT_FILE = "config.json"


def count_file_content(config: dict) -> bytes:
    """The ``config.json`` pushed beside an adapter (what it is, which files hold it)."""
    body = {
        "library_name": LIBRARY_NAME,
        "ace_format_version": config.get("format_version"),
        "adapter_config": "ace_config.json",
        "adapter_weights": "ace_adapter.safetensors",
    }
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")
ADAPTER_FILES_HINT = (
    f"ACE adapters contain {CONFIG_NAME} and {WEIGHTS_NAME} (written by ACEAdapter.save_pretrained() "
    "or ACEAdapter.push_to_hub())"
)
LOGIN_HINT = "pass token=... or run `hf auth login`"
SHA_RE = re.compile(r"[0-9a-f]{40}")


def check_local_folder(folder: Path, *, parent: Path | None = None) -> Path:
    """``folder`` must hold both adapter files; ``parent`` is the folder given when ``subfolder`` was used."""
    if not folder.is_dir():
        if parent is not None:
            raise ACEHubError(
                f"'{parent}' is a local folder but has no subfolder '{folder.relative_to(parent)}': check "
                f"subfolder=."
            )
        raise ACEValueError(f"'{folder}' does not exist or is not a folder; pass the adapter folder.")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise ACEAdapterFormatError(
            f"'{folder}' is not an ACE adapter folder: it has no {' and no '.join(missing)}. "
            f"{ADAPTER_FILES_HINT}."
        )
    return folder


def is_repo_id(value: str) -> bool:
    if value.startswith((".", "/", "~")) or "\\" in value or os.path.isabs(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def http_error(
    err: HfHubHTTPError, doing: str, *, sent_token: bool, write_to: str | None = None
) -> ACEHubError:
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
                "Pass a valid token=... or run `hf auth login` again (HF_TOKEN, if set, takes precedence "
                f"over "
                "a stored login)."
            )
        return ACEHubError(f"The Hub requires authentication for {doing} (401 Unauthorized): {LOGIN_HINT}.")
    if status == 403:
        if write_to is not None:
            fix = f"Use a token with the 'write' role whose account can write to '{write_to}'"
        else:
            fix = "Use a token whose account has access to the repo"
        return ACEHubError(f"The Hub refused {doing} (403 Forbidden).{server} {fix} ({LOGIN_HINT}).")
    if status == 412:
        return ACEHubError(f"The branch moved while {doing} (412 Precondition Failed): retry.")
    return ACEHubError(
        f"The Hub answered HTTP {status} while {doing}.{server} Retry later; if it persists, check "
        f"HF_ENDPOINT "
        f"({constants.ENDPOINT})."
    )


def token_available(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str):
        return bool(token)
    return get_token() is not None


def is_network_error(err: BaseException) -> bool:
    module = type(err).__module__.split(".")[0]
    transports = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
    return isinstance(err, (ConnectionError, TimeoutError)) or module in transports
