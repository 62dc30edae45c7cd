"""A large but realistic policy document for benchmarks (docs/policy-format.md).

`build_policy(rules, domains)` returns a policy whose rules exercise every kind of condition
(domains, categories, URL patterns, clients, methods, ports, applications, schedules) and whose
categories list `domains` domains in all. No rule matches a request to a loopback origin from a
loopback client, and the default action is `allow`: a benchmark request therefore walks the whole
rule list before it is allowed, the most expensive path through the policy.

Run as a script it writes the document to a file (or stdout):

    python bench/big_policy.py --rules 200 --domains 10000 -o /tmp/policy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

CATEGORY_COUNT = 20
APPLICATION_COUNT = 10
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def category_name(index: int) -> str:
    return f"bench-category-{index:02d}"


def category_domain(category: int, index: int) -> str:
    """The index-th domain listed in a category: under the reserved .test top-level domain."""
    return f"site{index:05d}.cat{category:02d}.bench.test"


def _categories(domains: int) -> dict[str, Any]:
    categories: dict[str, Any] = {}
    per_category, extra = divmod(domains, CATEGORY_COUNT)
    for c in range(CATEGORY_COUNT):
        count = per_category + (1 if c < extra else 0)
        categories[category_name(c)] = {
            "description": f"Benchmark category {c}",
            "domains": [category_domain(c, i) for i in range(count)],
        }
    return categories


def _applications() -> list[dict[str, Any]]:
    return [
        {
            "name": f"bench-app-{a}",
            "description": f"Benchmark application {a}",
            "hosts": [f"app{a}.bench.test", f"*.app{a}.bench.test"],
            "paths": [f"/api/v{a}/*"],
            "headers": {"user-agent": f"BenchApp{a}/*"},
        }
        for a in range(APPLICATION_COUNT)
    ]


def _rule(index: int) -> dict[str, Any]:
    """Rule `index`: one of eight shapes, each with conditions a loopback request never meets."""
    name = f"bench-rule-{index:03d}"
    shape = index % 8
    rule: dict[str, Any] = {"name": name, "action": "deny", "reason": f"Blocked by {name}"}
    if shape == 0:
        rule["domains"] = [f"blocked{index}.bench.test", f"*.blocked{index}.example.test"]
    elif shape == 1:
        rule["categories"] = [category_name(index % CATEGORY_COUNT)]
    elif shape == 2:
        rule["url_patterns"] = [f"*/ads{index}/*", f"*.bench{index}.swf"]
    elif shape == 3:
        # Loopback clients never come from these networks.
        rule["clients"] = [f"10.{index % 256}.0.0/16", f"192.0.2.{index % 256}"]
    elif shape == 4:
        rule["methods"] = ["DELETE", "PATCH"]
        rule["domains"] = [f"*.api{index}.bench.test"]
    elif shape == 5:
        rule["ports"] = [25, f"{6000 + index}-{6000 + index}"]
        rule["domains"] = [f"mail{index}.bench.test"]
    elif shape == 6:
        rule["applications"] = [f"bench-app-{index % APPLICATION_COUNT}"]
    else:
        # A schedule alone would match at some hour of the week: pair it with a domain condition.
        rule["domains"] = [f"*.games{index}.bench.test"]
        rule["schedule"] = {"days": _DAYS[:5], "from": "09:00", "to": "17:30", "timezone": "UTC"}
    return rule


def build_policy(rules: int = 200, domains: int = 10000) -> dict[str, Any]:
    """A policy with `rules` deny rules and `domains` category domains, default action allow."""
    if rules < 0 or domains < 0:
        raise ValueError("rules and domains must not be negative")
    return {
        "format": "safesquid-policy/1",
        "comment": f"Benchmark policy: {rules} rules, {domains} category domains",
        "access": {"default_action": "allow", "rules": [_rule(i) for i in range(rules)]},
        "categories": _categories(domains),
        "applications": _applications(),
        "connect": {"allowed_ports": [443]},
    }


def write_policy_file(rules: int = 200, domains: int = 10000, directory: str | None = None) -> str:
    """Write `build_policy(rules, domains)` to a new temporary file and return its path.

    The caller removes the file (or the directory it passed) when done.
    """
    fd, path = tempfile.mkstemp(prefix="bench-policy-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(build_policy(rules, domains), f)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--domains", type=int, default=10000)
    parser.add_argument("-o", "--output", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    document = build_policy(args.rules, args.domains)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
    else:
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
