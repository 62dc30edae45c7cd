"""`pip install .` carries everything a node needs: the plugin, templates, sample files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=170,
    )
    [wheel] = out.glob("safesquid_tw-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_the_twistd_plugin_is_installed(wheel_names):
    assert "twisted/plugins/safesquid_plugin.py" in wheel_names
    # Twisted's plugin folder is a namespace shared by every package: never ship its __init__.
    assert "twisted/plugins/__init__.py" not in wheel_names
    assert "twisted/__init__.py" not in wheel_names


def test_every_template_and_sample_file_is_installed(wheel_names):
    expected = {f"safesquid_tw/data/templates/{p.relative_to(REPO / 'templates').as_posix()}"
                for p in (REPO / "templates").rglob("*") if p.is_file()}
    expected |= {f"safesquid_tw/data/etc/{p.relative_to(REPO / 'etc').as_posix()}"
                 for p in (REPO / "etc").rglob("*") if p.is_file()}
    assert "safesquid_tw/data/etc/policy.json" in expected
    assert expected <= wheel_names, sorted(expected - wheel_names)


def test_every_package_is_installed(wheel_names):
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "safesquid_tw").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in wheel_names
