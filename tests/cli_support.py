"""Shared assertion for command-line entry points: a user error is one ``error:`` line and exit code 2."""

from collections.abc import Callable

import pytest

from harness.errors import USER_ERROR_EXIT


def assert_one_line_user_error(call: Callable[[], object], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
