"""Job deadlines and SSH cleanup limits: read from the environment, documented defaults, and a value
that would disable the bound (0, negative, NaN, text) refused at start."""

from __future__ import annotations

import pytest

from src.settings import Settings, SettingsError

NAMES = [
    "JOB_DEADLINE_SNAPSHOT_S",
    "JOB_DEADLINE_RESTORE_S",
    "JOB_DEADLINE_HIBERNATE_S",
    "JOB_DEADLINE_WAKE_S",
    "JOB_DEADLINE_OTHER_S",
    "SSH_UPLOAD_TIMEOUT_S",
    "SSH_CLEANUP_TIMEOUT_S",
]


def test_defaults_and_the_deadline_of_each_kind() -> None:
    s = Settings.from_env({}, dotenv=False)
    assert s.job_deadline_s("create_snapshot") == 14400 and s.job_deadline_s("restore_snapshot") == 14400
    assert s.job_deadline_s("hibernate") == 18000 and s.job_deadline_s("wake") == 18000
    for other in ("verify_snapshot", "delete_snapshot", "pause", "resume", "gc", "a-kind-added-later"):
        assert s.job_deadline_s(other) == 7200
    assert s.ssh_upload_timeout_s == 120 and s.ssh_cleanup_timeout_s == 30


def test_values_from_the_environment() -> None:
    s = Settings.from_env(
        {"JOB_DEADLINE_SNAPSHOT_S": "3", "JOB_DEADLINE_WAKE_S": "90.5", "SSH_CLEANUP_TIMEOUT_S": "6"}, dotenv=False
    )
    assert s.job_deadline_s("create_snapshot") == 3 and s.job_deadline_s("wake") == 90.5
    assert s.ssh_cleanup_timeout_s == 6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "-inf", "1e999", "soon", "4h"])
def test_a_value_that_bounds_nothing_is_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value}, dotenv=False)
