"""The client's settings table: defaults, STORM_* variables, arguments, and clear refusals."""

from __future__ import annotations

import pytest

from client.settings import ClientSettings


def test_defaults_without_variables():
    settings = ClientSettings.load({})
    assert (settings.policy, settings.timeout_s, settings.verify, settings.prefetch_bytes) == (
        "auto",
        2.0,
        False,
        64 << 20,
    )
    assert settings.resolved_endpoint.startswith("ipc://")


def test_variables_then_arguments_win():
    environ = {"STORM_POLICY": "wait", "STORM_PREFETCH_BYTES": "8MiB", "STORM_VERIFY": "yes", "STORM_TIMEOUT_S": "5"}
    settings = ClientSettings.load(environ)
    assert (settings.policy, settings.prefetch_bytes, settings.verify, settings.timeout_s) == (
        "wait",
        8 << 20,
        True,
        5.0,
    )
    settings = ClientSettings.load(environ, policy="error", verify=False, timeout_s=None)
    assert (settings.policy, settings.verify, settings.timeout_s) == ("error", False, 5.0)


@pytest.mark.parametrize(
    ("environ", "overrides", "message"),
    [
        ({"STORM_POLICY": "drop"}, {}, "STORM_POLICY='drop'"),
        ({"STORM_RESERVE_IDLE_S": "0"}, {}, "STORM_RESERVE_IDLE_S='0'"),
        ({"STORM_PREFETCH_BYTES": "lots"}, {}, "STORM_PREFETCH_BYTES='lots'"),
        ({"STORM_VERIFY": "maybe"}, {}, "STORM_VERIFY='maybe'"),
        ({}, {"reserve_idle_s": float("inf")}, "reserve_idle_s must be a positive number"),
        ({}, {"policy": "drop"}, "policy must be one of"),
    ],
)
def test_bad_values_name_the_setting(environ, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ClientSettings.load(environ, **overrides)
