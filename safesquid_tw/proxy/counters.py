"""The proxy's running totals: plain integers the request path bumps, read only at scrape time.

Calling prometheus-client objects per request costs locks and label look-ups on the hot path;
instead each finished request makes one call here (a few dict and list updates), and
`safesquid_tw.metrics.collectors.ProxyCollector` turns these numbers into metric families when
Prometheus asks. Only the reactor thread writes; a scrape (also on the reactor thread) reads.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds) of the request duration histogram: a cache hit or block page at the
# low end, a slow origin at the high end. Prometheus adds +Inf.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    """`2xx` for 204; `0xx` when no status was sent (the client left first)."""
    index = status // 100
    return _STATUS_CLASSES[index] if 0 <= index < len(_STATUS_CLASSES) else "other"


class ProxyCounters:
    __slots__ = ("requests", "duration_counts", "duration_sum", "bytes_in", "bytes_out", "upstream_failures",
                 "_classes")

    def __init__(self) -> None:
        # (action, status class) -> finished requests
        self.requests: dict[tuple[str, str], int] = {}
        # one count per bucket of DURATION_BUCKETS plus one for +Inf (not cumulative here)
        self.duration_counts: list[int] = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.bytes_in = 0  # request bodies received from clients (and tunnel bytes client -> origin)
        self.bytes_out = 0  # bytes sent to clients
        self.upstream_failures: dict[str, int] = {}  # Proxy-Status error type -> count
        self._classes: dict[int, str] = {}

    def count_request(self, action: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        cls = self._classes.get(status)
        if cls is None:
            cls = self._classes[status] = status_class(status)
        key = (action, cls)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.duration_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def upstream_failed(self, kind: str) -> None:
        self.upstream_failures[kind] = self.upstream_failures.get(kind, 0) + 1

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] as Prometheus wants them, +Inf last."""
        out = []
        total = 0
        for bound, count in zip(DURATION_BUCKETS, self.duration_counts):
            total += count
            out.append((_float_text(bound), total))
        total += self.duration_counts[-1]
        out.append(("+Inf", total))
        return out


def _float_text(value: float) -> str:
    return repr(float(value))


__all__ = ["DURATION_BUCKETS", "ProxyCounters", "status_class"]
