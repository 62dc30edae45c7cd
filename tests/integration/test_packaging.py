"""`pip install .` carries everything a node needs: the plugin, templates, sample files."""

from __future__ import annotations

import json
import os
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


INSTALLED_CHECK = r"""
import json, sys
from pathlib import Path
import safesquid_tw
from safesquid_tw import pages, resources
from safesquid_tw.policy.codec import load_policy_file
from safesquid_tw.portal.app import static_dir
package = Path(safesquid_tw.__file__).resolve().parent
page = pages.render_block_page(url="http://x.test/", rule="r", reason="why", category=None, application=None,
                               node="n", policy_version=1, client="10.0.0.1", user=None)
print(json.dumps({
    "package": str(package),
    "templates": str(resources.templates_dir()),
    "static": str(static_dir()),
    "policy": load_policy_file(str(resources.sample_policy_path())).version,
    "page": b"why" in page,
    "portal_templates": (resources.templates_dir() / "portal").is_dir(),
}))
"""


def test_the_installed_package_finds_its_own_files(tmp_path):
    """Run from elsewhere, without the source tree on the path: what a `pip install .` user has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", INSTALLED_CHECK], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    if "No module named 'safesquid_tw'" in result.stderr:
        pytest.skip("safesquid-tw is not installed in this environment (scripts/test installs it)")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    package = Path(found["package"])
    assert package != REPO / "safesquid_tw", "the source tree was imported, not the installed package"
    for key in ("templates", "static"):
        assert package in Path(found[key]).parents, f"{key} resolved outside the package: {found[key]}"
    assert found["policy"] == 1 and found["page"] and found["portal_templates"]
