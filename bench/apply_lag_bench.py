"""Reactor lag inside one node while big policy versions are applied, without other processes.

    .venv/bin/python bench/apply_lag_bench.py [--rules 1000] [--domains 100000] [--role slave|master]
                                              [--phase 4] [--rounds 2] [--tick 0.005]

`push_latency_bench.py` measures the whole cluster, where three slaves, a master and the client
share the machine's cores; this one separates what a node does to its own reactor thread from
that contention. In one process it runs the node's own apply path (`PolicyStore` with its
`PolicyApplier` in a one-thread pool, the node's GIL switch interval and swap observers, and the
replaced version freed in the policy thread): as a slave (`install_blob_async` of the master's
bytes) or as a master (`apply_document_async` of a parsed document, shadowed-rule warnings
included). On the reactor a tick every `--tick` seconds does what a request does to the GIL:
four system calls on a loopback socket pair, each giving the GIL away and taking it back. Phases
of `--phase` seconds alternate, `--rounds` times: quiet, then versions applied back to back.

Prints p50/p99/max of the ticks' lateness (how long past its time each tick ran, plus the time of
its system calls) in each kind of phase, their p99 ratio, and the versions' wall and CPU time.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from big_policy import build_policy  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from safesquid_tw.assembly.base import POLICY_SWITCH_INTERVAL, state_follows_store  # noqa: E402
from safesquid_tw.nodestate import NodeState  # noqa: E402
from safesquid_tw.policy.applier import PolicyApplier, policy_thread_pool, thread_runner  # noqa: E402
from safesquid_tw.policy.codec import canonical_bytes  # noqa: E402
from safesquid_tw.policy.store import PolicyStore  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(args: argparse.Namespace) -> int:
    base = build_policy(args.rules, args.domains)
    blob = canonical_bytes(base)
    pool = policy_thread_pool()
    pool.start()
    store = PolicyStore(tempfile.mkdtemp(prefix="apply-lag-"))
    store.applier = PolicyApplier(thread_runner(reactor, pool), switch_interval=POLICY_SWITCH_INTERVAL)
    store.shadow_warnings = args.role != "slave"
    state_follows_store(NodeState(role=args.role, node="bench"), store, now=reactor.seconds)
    if not args.no_freeze:
        # As a node's process does (tap.makeService): the running policy out of the collector.
        from safesquid_tw.policy.heapfreeze import freeze_after_swaps

        freeze_after_swaps(store)
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    samples: list[tuple[float, float]] = []
    due = [time.monotonic() + args.tick]

    def tick() -> None:
        now = time.monotonic()
        for _ in range(2):  # four system calls, as a small request makes at least
            left.send(b"x")
            right.recv(16)
        samples.append((now, time.monotonic() - due[0]))
        due[0] = now + args.tick

    ticker = task.LoopingCall(tick)
    ticker.start(args.tick, now=False)
    phases: list[tuple[str, float, float]] = []
    applies: list[tuple[float, float]] = []
    version = 0
    try:
        for _round in range(args.rounds):
            start = time.monotonic()
            await task.deferLater(reactor, args.phase, lambda: None)
            phases.append(("quiet", start, time.monotonic()))
            start = time.monotonic()
            while time.monotonic() - start < args.phase:
                version += 1
                began = time.monotonic()
                if args.role == "slave":
                    await store.install_blob_async(blob, version, source="master")
                else:
                    # Parsed in the policy thread, as the API parses a body off the reactor
                    # (a piece at a time where the tree has that, as its API does).
                    await store.apply_document_async(
                        lambda version=version: dict(_loads(blob), comment=f"version {version}"),
                        source="bench")
                applies.append((time.monotonic() - began, store.applier.last_work_cpu or 0.0))
            phases.append(("applies", start, time.monotonic()))
    finally:
        ticker.stop()
        pool.stop()
    by_kind: dict[str, list[float]] = {"quiet": [], "applies": []}
    for kind, begin, end in phases:
        by_kind[kind] += [lag for at, lag in samples if begin <= at < end]
    print(f"policy: {args.rules} rules, {args.domains} domains, {len(blob) / 1e6:.1f} MB; applied as a {args.role}; "
          f"GIL switch interval while applying {POLICY_SWITCH_INTERVAL * 1e3:.1f} ms")
    print(f"reactor tick lateness (ms), a tick every {args.tick * 1e3:.0f} ms:")
    for kind, values in by_kind.items():
        print(f"  {kind:7s} n={len(values):5d}  p50={percentile(values, .5) * 1e3:6.2f}  "
              f"p99={percentile(values, .99) * 1e3:6.2f}  max={max(values) * 1e3:6.2f}")
    ratio = percentile(by_kind["applies"], .99) / percentile(by_kind["quiet"], .99)
    print(f"  p99 ratio applies/quiet = {ratio:.2f}")
    walls = sorted(w for w, _ in applies)
    cpus = sorted(c for _, c in applies)
    print(f"{len(applies)} versions: wall median {walls[len(walls) // 2]:.2f} s, "
          f"policy thread CPU median {cpus[len(cpus) // 2]:.2f} s")
    return 0


def _loads(data: bytes):
    try:
        from safesquid_tw.policy.piecewise_json import loads_in_pieces
    except ImportError:  # a tree from before it
        return json.loads(data)
    return loads_in_pieces(data, depth=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=100000)
    parser.add_argument("--role", choices=("slave", "master"), default="slave")
    parser.add_argument("--phase", type=float, default=4.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tick", type=float, default=0.005, help="seconds between reactor ticks")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the running policy in the garbage collector (as before policy/heapfreeze.py)")
    args = parser.parse_args(argv)
    outcome: list = []
    d = defer.ensureDeferred(run(args))
    d.addBoth(outcome.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if outcome and isinstance(outcome[0], int):
        return outcome[0]
    if outcome:
        outcome[0].printTraceback()
    return 1


if __name__ == "__main__":
    sys.exit(main())
