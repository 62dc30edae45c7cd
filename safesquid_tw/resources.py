"""Where the packaged templates and sample files are.

An installed package carries them as `safesquid_tw.data.templates` and `safesquid_tw.data.etc`
(setup.cfg maps the top-level `templates/` and `etc/` folders there); a source checkout has them
beside the package.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path:
    try:
        found = importlib.resources.files(f"safesquid_tw.data.{name}")
        path = Path(str(found))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return _SOURCE_ROOT / name


def templates_dir() -> Path:
    return _data_dir("templates")


def etc_dir() -> Path:
    return _data_dir("etc")


def sample_policy_path() -> Path:
    return etc_dir() / "policy.json"
