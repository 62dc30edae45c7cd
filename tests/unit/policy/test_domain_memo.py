"""policy/hosts.py: within `domain_memo()` each pattern is parsed once; results and errors are
those of the plain parse."""

from __future__ import annotations

import threading

import pytest

from safesquid_tw.policy.hosts import domain_memo, parse_domain_pattern

PATTERNS = ["Example.TEST.", "*.example.test", "[::1]", "192.0.2.1", "xn--bcher-kva.test", "bücher.test", "_srv.a-b.test"]
BAD = ["a..b", "-a.test", "a-.test", "*.192.0.2.1", "a*.test", "256.1.2.3", "x" * 64 + ".test", ""]


def test_inside_a_memo_each_pattern_is_parsed_once_with_the_same_result():
    plain = [parse_domain_pattern(p) for p in PATTERNS]
    with domain_memo():
        first = [parse_domain_pattern(p) for p in PATTERNS]
        again = [parse_domain_pattern(p) for p in PATTERNS]
    assert first == plain and all(a is b for a, b in zip(first, again))
    assert parse_domain_pattern(PATTERNS[0]) is not first[0]  # the table went with the block


@pytest.mark.parametrize("pattern", BAD)
def test_errors_are_raised_every_time_and_never_kept(pattern):
    with pytest.raises(ValueError) as plain:
        parse_domain_pattern(pattern)
    with domain_memo():
        for _ in range(2):
            with pytest.raises(ValueError) as memo:
                parse_domain_pattern(pattern)
            assert str(memo.value) == str(plain.value)


def test_a_memo_belongs_to_its_thread():
    seen = []
    with domain_memo():
        mine = parse_domain_pattern("a.test")
        other = threading.Thread(target=lambda: seen.append(parse_domain_pattern("a.test")))
        other.start()
        other.join()
        assert parse_domain_pattern("a.test") is mine
    assert seen == [mine] and seen[0] is not mine
