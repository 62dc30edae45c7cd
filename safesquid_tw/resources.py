"""Where the packaged templates, static files and sample files are.

An installed package carries them as `safesquid_tw/data/templates`, `.../static` and `.../etc`
(setup.cfg maps the top-level `templates/`, `static/` and `etc/` folders there); a source checkout
has them beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE.parent


def _data_dir(name: str) -> Path:
    installed = _PACKAGE / "data" / name
    if installed.is_dir():
        return installed
    return _SOURCE_ROOT / name


def templates_dir() -> Path:
    return _data_dir("templates")


def static_dir() -> Path:
    return _data_dir("static")


def etc_dir() -> Path:
    return _data_dir("etc")


def sample_policy_path() -> Path:
    return etc_dir() / "policy.json"
