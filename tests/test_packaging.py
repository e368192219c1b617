"""The wheel must contain every llmx subpackage: pyproject.toml lists them explicitly (kernels/ is
mapped onto llmx.kernels, which rules out automatic discovery)."""

import tomllib

from conftest import REPO


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "llmx").rglob("__init__.py")}
    on_disk.add("llmx.kernels")
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set(), "these listed packages do not exist"
