"""xenstore path bounds that bench/mutants.py found untested (issue 9, mutation testing)."""
from __future__ import annotations

import pytest

from aiovmm.xenstore import core
from aiovmm.xenstore.core import XsError


def test_absolute_path_of_abs_path_max_is_accepted_one_more_is_einval():
    """XENSTORE_ABS_PATH_MAX (3072) is the longest absolute path xenstored accepts; one
    character more is EINVAL."""
    path = "/" + "x" * (core.ABS_PATH_MAX - 1)
    assert core.canonical(3, path) == path
    with pytest.raises(XsError) as e:
        core.canonical(3, path + "x")
    assert e.value.errno == core._errno.EINVAL
