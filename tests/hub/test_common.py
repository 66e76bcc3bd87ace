"""What the Hub modules share: repo-id checks, token detection and the HTTP error translation."""

import types

import pytest
from huggingface_hub.errors import HfHubHTTPError

from ace_diffusers.errors import ACEAdapterFormatError, ACEHubError, ACEValueError
from ace_diffusers.format import CONFIG_NAME, WEIGHTS_NAME
from ace_diffusers.hub.common import (
    check_local_folder,
    http_error,
    is_network_error,
    is_repo_id,
    token_available,
)


def test_repo_ids_and_paths_are_told_apart():
    assert is_repo_id("org/erase-van-gogh")
    for path in ("./adapter", "/abs/adapter", "~/adapter", "a\\b", "not a repo!"):
        assert not is_repo_id(path), path


def test_a_local_folder_must_hold_both_files(tmp_path):
    with pytest.raises(ACEValueError, match="does not exist"):
        check_local_folder(tmp_path / "missing")
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(ACEAdapterFormatError, match=WEIGHTS_NAME):
        check_local_folder(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    assert check_local_folder(tmp_path) == tmp_path


def test_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert (
        token_available(None)
        and token_available("x")
        and not token_available(False)
        and not token_available("")
    )


def _http(status):
    response = types.SimpleNamespace(status_code=status, headers={}, request=None)
    err = HfHubHTTPError(f"{status} error", response=response)
    err.server_message = "nope"
    return err


@pytest.mark.parametrize(
    "status, sent, write_to, message",
    [
        (401, True, None, "invalid or expired"),
        (401, False, None, "requires authentication"),
        (403, False, "org", "'write' role"),
        (412, True, None, "retry"),
        (500, True, None, "HTTP 500"),
    ],
)
def test_http_errors_name_the_cause_and_the_fix(status, sent, write_to, message):
    error = http_error(_http(status), "pushing to 'org/x'", sent_token=sent, write_to=write_to)
    assert isinstance(error, ACEHubError) and message in str(error)


def test_transport_errors_count_as_network_errors():
    assert is_network_error(ConnectionError()) and is_network_error(TimeoutError())
    assert not is_network_error(ValueError())
