"""`python -m safesquid_tw.workers CONFIG-JSON`: one worker process of a node started with
--workers (see safesquid_tw/workers/child.py). Not started by hand."""

from __future__ import annotations

import sys

from safesquid_tw.workers.child import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
