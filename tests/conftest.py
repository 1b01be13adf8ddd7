"""Unit tests see neither the host's /etc/sdnsup/sdnsup.toml nor SDNSUP_* variables."""

from __future__ import annotations

import os

import pytest

from sdnsup import defaults


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-sdnsup.toml")
    for name in list(os.environ):
        if name.startswith("SDNSUP_"):
            monkeypatch.delenv(name)
