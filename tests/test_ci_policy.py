"""The policy for a real part a test needs and cannot have (``conftest.require``): a skip
with its reason on a developer's machine, a failure under ``CI=true``, so that CI never goes
green by skipping the browser or the team-server tests.
"""
from __future__ import annotations

import pytest

from conftest import require


def outcome(part: str, reason: str) -> BaseException:
    """What ``require`` raised, caught whatever it is (a skip must not skip this test)."""
    try:
        require(part, reason)
    except BaseException as e:  # noqa: BLE001 - pytest's skip and fail are BaseExceptions
        return e
    raise AssertionError("require returned; it must skip or fail")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_missing_part_skips_and_prints_its_reason(monkeypatch, capsys, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    e = outcome("chromium", "/usr/bin/chromium is not installed")
    assert type(e) is pytest.skip.Exception, repr(e)
    assert str(e) == "chromium is needed and missing: /usr/bin/chromium is not installed"
    assert "SKIPPED: chromium is needed and missing" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_under_ci_a_missing_part_fails_in_one_line(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    e = outcome("playwright", "its Python package cannot be imported")
    assert type(e) is pytest.fail.Exception, repr(e)
    assert str(e) == "CI=true: playwright is needed and missing: its Python package cannot be imported"
