"""Shared test set-up: the source tree is imported before any installed copy of the package."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# `pip install .` puts a copy of safesquid_tw into site-packages; the tests exercise the tree
# they live in, whichever way pytest was started (`pytest` or `python -m pytest`).
if str(REPO_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(REPO_ROOT))

# A real PostgreSQL for the report-store tests (started on first use, once per session).
sys.path.insert(1, str(Path(__file__).resolve().parent))
from pgserver import postgres_server  # noqa: E402,F401
