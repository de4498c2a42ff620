"""The wheel ships every subpackage and the shaders (pyproject lists packages explicitly)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metalcore").rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["metalcore.shaders"] == "shaders"
    assert set(config["package-data"]["metalcore.shaders"]) >= {"*.metal", "*.h"}
    assert list((ROOT / "shaders").glob("*.metal")), "no shaders to ship"
