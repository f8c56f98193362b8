"""What `pip install aiovmm` (a wheel, not the editable install the suite runs from) ships:
every Python package of the tree. A wheel built with the old list lacked aiovmm.xenstore and
backends' block and net packages, so `import aiovmm` failed outside a source checkout."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _packages_in_tree() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, where in cfg["package-dir"].items():
        base = ROOT / where
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_for_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    tree = _packages_in_tree()
    assert "aiovmm.xenstore" in tree and "aiovmm.backends.net" in tree
    assert tree - listed == set(), f"packages missing from pyproject.toml: {sorted(tree - listed)}"
    assert listed - tree == set(), f"listed but not in the tree: {sorted(listed - tree)}"
