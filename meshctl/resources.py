"""Where the files meshctl ships beside its code are: templates and the demo shop.

In a wheel they are package data (`meshctl/templates`, `meshctl/demo_services`, mapped from
the repository's top-level folders by pyproject.toml). In a source checkout or an editable
install they are those top-level folders themselves (`templates/`, `demo-services/`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# (folder name inside the installed package, folder name in the repository)
_TEMPLATES = ("templates", "templates")
_DEMO = ("demo_services", "demo-services")
# The folder the demo's commands expect beside the manifest (`python demo-services/cart.py`).
DEMO_FOLDER = "demo-services"


def _find(names: tuple[str, str]) -> Path:
    installed, in_repo = names
    for candidate in (PACKAGE_DIR / installed, PACKAGE_DIR.parent / in_repo):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return PACKAGE_DIR / installed  # missing: the caller's error names the installed place


def templates_dir() -> Path:
    return _find(_TEMPLATES)


def demo_dir() -> Path:
    return _find(_DEMO)


def copy_demo(target: Path, overwrite: bool) -> list[Path]:
    """Copy the demo services into `target/demo-services`; returns the files written.

    Existing files are kept unless `overwrite`, so a user's edits survive a second `init`.
    """
    source = demo_dir()
    destination = target / DEMO_FOLDER
    destination.mkdir(exist_ok=True)
    written = []
    for path in sorted(source.glob("*.py")):
        if path.name == "__init__.py":
            continue
        copy = destination / path.name
        if copy.exists() and not overwrite:
            continue
        shutil.copyfile(path, copy)
        written.append(copy)
    return written
