"""Typed errors: every one is an ACEError and the built-in exception callers already catch."""

import pytest

from ace_diffusers import errors


@pytest.mark.parametrize(
    "error, builtin",
    [
        (errors.ACEValueError, ValueError),
        (errors.ACEAdapterFormatError, ValueError),
        (errors.ACEArchitectureMismatchError, ValueError),
        (errors.ACEAdapterNameError, KeyError),
        (errors.ACECompatibilityError, RuntimeError),
        (errors.ACEHubError, OSError),
    ],
)
def test_each_error_is_an_ace_error_and_its_builtin(error, builtin):
    assert issubclass(error, errors.ACEError) and issubclass(error, builtin)
    with pytest.raises(builtin):
        raise error("message")


def test_name_errors_read_like_sentences_not_quoted_keys():
    assert (
        str(errors.ACEAdapterNameError("No ACE adapter named 'x' is loaded."))
        == "No ACE adapter named 'x' is loaded."
    )
    assert str(errors.ACEAdapterNameError()) == ""


def test_truncation_is_a_warning_category():
    assert issubclass(errors.ACETruncationWarning, UserWarning)
