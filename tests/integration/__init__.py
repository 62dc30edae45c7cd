"""Integration tests: real twistd nodes and origin servers on loopback (a package, so the
test module names never collide with tests/unit)."""
