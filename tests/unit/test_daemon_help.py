"""stormd --help: every setting, with its variable and default, and no crash on a default with a %."""

from __future__ import annotations

import contextlib
import io

import pytest

from storm_service.config import SETTINGS, build_parser


def test_stormd_help_lists_every_setting_with_its_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    for setting in SETTINGS:
        assert setting.flag in out.getvalue() and setting.env in out.getvalue()
    assert "default 80%]" in out.getvalue()
