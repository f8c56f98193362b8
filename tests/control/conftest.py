"""Fixtures of the control-plane tests (helpers in ctlhelp.py)."""
from __future__ import annotations

import pytest

from .ctlhelp import Daemon


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()
