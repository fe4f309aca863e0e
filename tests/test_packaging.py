"""What the distribution installs: one top-level package, ``mtp_lightning``, with the repository's
``callbacks/`` folder inside it as ``mtp_lightning.callbacks`` (a generic top-level ``callbacks`` could
collide with another distribution's), and every subpackage of the source tree listed."""

import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_only_mtp_lightning_is_installed_at_the_top_level():
    cfg = _setuptools()
    assert {name.split(".")[0] for name in cfg["packages"]} == {"mtp_lightning"}
    assert cfg["package-dir"] == {"mtp_lightning.callbacks": "callbacks"}


def test_every_subpackage_of_the_source_is_listed():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mtp_lightning").rglob("__init__.py")}
    assert set(_setuptools()["packages"]) == found | {"mtp_lightning.callbacks"}


def test_the_callbacks_folder_is_imported_as_mtp_lightning_callbacks():
    module = importlib.import_module("mtp_lightning.callbacks")
    assert Path(module.__file__).resolve() == REPO / "callbacks" / "__init__.py"
    from mtp_lightning.callbacks.safety import GracefulStopCallback

    assert GracefulStopCallback.__module__ == "mtp_lightning.callbacks.safety"
