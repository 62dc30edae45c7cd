"""Time policy decisions against the target: under 20 microseconds per decide() with a 200-rule
policy and 10,000 category domains loaded.

    python bench/decision_bench.py [--rules 200] [--domains 10000] [--decisions 200000] [--sample]

Prints compile time, average microseconds per decision for a realistic mix of requests (hosts
seen before, and hosts never seen before), category look-up times, and each figure's ratio to
the target (below 1.00 is within it). Synthetic data comes from a fixed seed, so runs compare.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safesquid_tw.policy.codec import canonical_bytes, policy_from_document  # noqa: E402
from safesquid_tw.policy.compiled import CompiledPolicy  # noqa: E402
from safesquid_tw.policy.model import RequestFacts  # noqa: E402
from safesquid_tw.policy.validate import validate_document  # noqa: E402
from safesquid_tw.resources import sample_policy_path  # noqa: E402

TARGET_US = 20.0
CATEGORY_COUNT = 25
TLDS = ("com", "net", "org", "de", "co.uk", "io", "fr")
HASH = "$argon2id$v=19$m=8,t=1,p=1$cJu0yK/+nzC1VtADOSxZHg$zwU5BT7rNZl7tWAPXzBgIdpA+MlVhFqoaKeWqBAiDQc"  # "bench"


def _name(rng: random.Random, syllables: int = 3) -> str:
    parts = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "xe", "zu", "pa", "do", "gi", "be")
    return "".join(rng.choice(parts) for _ in range(syllables)) + str(rng.randrange(1000))


def synthetic_document(rule_count: int, domain_count: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    categories: dict[str, Any] = {f"cat{i:02d}": {"description": f"category {i}", "domains": []} for i in range(CATEGORY_COUNT)}
    names = list(categories)
    seen: set[str] = set()
    while len(seen) < domain_count:
        domain = f"{_name(rng)}.{rng.choice(TLDS)}"
        if rng.random() < 0.2:
            domain = f"{_name(rng, 2)}.{domain}"
        if domain in seen:
            continue
        seen.add(domain)
        categories[rng.choice(names)]["domains"].append(domain)
    applications = [
        {"name": f"app{i}", "hosts": [f"*.{_name(rng)}.com", f"{_name(rng)}.net"],
         **({"paths": ["/api/*"]} if i % 3 == 0 else {}),
         **({"headers": {"user-agent": f"*App{i}*"}} if i % 4 == 0 else {})}
        for i in range(30)
    ]
    groups = [{"name": f"group{i}"} for i in range(10)]
    users = [{"name": f"user{i}", "password_hash": HASH, "groups": [f"group{i % 10}"]} for i in range(50)]
    rules = []
    for i in range(rule_count - 1):
        kind = i % 10
        rule: dict[str, Any] = {"name": f"rule{i:03d}", "action": "deny" if i % 3 else "allow"}
        if kind in (0, 1, 2):
            rule["domains"] = [f"{_name(rng)}.com", f"*.{_name(rng)}.net", f"*.{_name(rng)}.org"]
        elif kind in (3, 4):
            rule["categories"] = rng.sample(names, 2)
            if kind == 4:
                rule["schedule"] = {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "09:00", "to": "17:00",
                                    "timezone": "Europe/Berlin"}
        elif kind == 5:
            rule["applications"] = [f"app{rng.randrange(30)}"]
            rule["methods"] = ["POST", "PUT"]
        elif kind == 6:
            rule["clients"] = [f"10.{rng.randrange(256)}.0.0/16", f"fd00:{rng.randrange(65536):x}::/32"]
            rule["ports"] = [80, "8000-8100"]
        elif kind == 7:
            rule["groups"] = [f"group{rng.randrange(10)}"]
            rule["categories"] = [rng.choice(names)]
        elif kind == 8:
            rule["domains"] = [f"*.{_name(rng)}.com"]
            rule["url_patterns"] = ["*/ads/*", "*.swf", "*/tracking?*"]
        else:
            rule["clients"] = [f"192.168.{rng.randrange(256)}.0/24"]
            rule["methods"] = ["CONNECT"]
            rule["ports"] = ["1-442", "444-65535"]
        rules.append(rule)
    rules.append({"name": "allow-local", "action": "allow", "clients": ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]})
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": "deny", "rules": rules},
        "authentication": {"enabled": True, "exempt_networks": ["10.0.0.0/8"]},
        "groups": groups,
        "users": users,
        "categories": categories,
        "applications": applications,
    }


def request_mix(doc: dict[str, Any], count: int, seed: int = 11, fresh_hosts: bool = False) -> list[RequestFacts]:
    """Requests as a gateway sees them: mostly categorised and well-known hosts, some unknown."""
    rng = random.Random(seed)
    category_domains = [d for c in doc["categories"].values() for d in c["domains"]]
    rule_domains = [d.removeprefix("*.") for r in doc["access"]["rules"] for d in r.get("domains", [])]
    app_hosts = [h.removeprefix("*.") for a in doc["applications"] for h in a["hosts"]]
    now = datetime(2024, 5, 15, 10, 30, tzinfo=timezone.utc)
    facts = []
    for i in range(count):
        pick = rng.random()
        if pick < 0.5:
            host = rng.choice(category_domains)
        elif pick < 0.65 and rule_domains:
            host = rng.choice(rule_domains)
        elif pick < 0.75 and app_hosts:
            host = rng.choice(app_hosts)
        else:
            host = f"{_name(rng)}.example.net"
        if rng.random() < 0.5:
            host = f"{rng.choice(('www', 'cdn', 'api', 'img'))}.{host}"
        if fresh_hosts:
            host = f"n{i}.{host}"
        method = rng.choice(("GET", "GET", "GET", "POST", "CONNECT"))
        port = 443 if method == "CONNECT" else rng.choice((80, 80, 443, 8080))
        client = rng.choice((f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                             f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}", "203.0.113.9",
                             f"fd00:{rng.randrange(65536):x}::{rng.randrange(65536):x}"))
        user = rng.choice((None, None, f"user{rng.randrange(50)}"))
        groups = frozenset({f"group{int(user[4:]) % 10}"}) if user else frozenset()
        facts.append(RequestFacts(
            client_ip=client, method=method, scheme="https" if port == 443 else "http", host=host, port=port,
            path="" if method == "CONNECT" else rng.choice(("/", "/index.html", "/ads/banner.js", "/api/v1/items?id=3")),
            user=user, groups=groups, headers={"user-agent": "Mozilla/5.0"}, now=now,
        ))
    return facts


def time_decisions(compiled: CompiledPolicy, facts: list[RequestFacts], rounds: int) -> float:
    """Median over rounds of the average microseconds per decide()."""
    decide = compiled.decide
    results = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for f in facts:
            decide(f)
        results.append((time.perf_counter_ns() - start) / len(facts) / 1000)
    return statistics.median(results)


def time_categories(compiled: CompiledPolicy, hosts: list[str], rounds: int) -> float:
    category_of = compiled.category_of
    results = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for host in hosts:
            category_of(host)
        results.append((time.perf_counter_ns() - start) / len(hosts) / 1000)
    return statistics.median(results)


def report(label: str, micros: float, target: float | None = TARGET_US) -> None:
    ratio = f"  ratio to {target:g} us target: {micros / target:.2f}" if target else ""
    print(f"  {label:<48} {micros:9.2f} us{ratio}")


def fresh_compiled(doc: dict[str, Any]) -> CompiledPolicy:
    return policy_from_document(doc, 1).compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--domains", type=int, default=10000)
    parser.add_argument("--working-set", type=int, default=20000,
                        help="distinct requests replayed for the hosts-seen-before figures")
    parser.add_argument("--decisions", type=int, default=100000, help="requests for the every-host-new figures")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample", action="store_true", help="also time the sample policy (etc/policy.json)")
    args = parser.parse_args()

    doc = synthetic_document(args.rules, args.domains)
    print(f"synthetic policy: {args.rules} rules, {args.domains} category domains, "
          f"{len(canonical_bytes(doc)) // 1024} KiB canonical")
    start = time.perf_counter()
    canonical = validate_document(doc)
    validated = time.perf_counter()
    compiled = CompiledPolicy(canonical)
    done = time.perf_counter()
    print(f"  validate {1000 * (validated - start):.1f} ms, compile {1000 * (done - validated):.1f} ms")

    warm = request_mix(doc, args.working_set)
    for facts in warm:
        compiled.decide(facts)
    report("decide(), hosts seen before", time_decisions(compiled, warm, args.rounds))
    cold = request_mix(doc, args.decisions, fresh_hosts=True)
    report("decide(), every host (and most clients) new", time_decisions(fresh_compiled(doc), cold, 1))

    hosts = [f.host for f in warm]
    report("category_of(), hosts seen before", time_categories(compiled, hosts, args.rounds), None)
    report("category_of(), every host new", time_categories(fresh_compiled(doc), [f.host for f in cold], 1), None)

    if args.sample:
        sample_doc = json.loads(sample_policy_path().read_text(encoding="utf-8"))
        sample = fresh_compiled(sample_doc)
        mix = request_mix(sample_doc, args.working_set)
        for facts in mix:
            sample.decide(facts)
        print("sample policy (etc/policy.json):")
        report("decide(), hosts seen before", time_decisions(sample, mix, args.rounds))
        cold = request_mix(sample_doc, args.decisions, fresh_hosts=True)
        report("decide(), every host (and most clients) new", time_decisions(fresh_compiled(sample_doc), cold, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
