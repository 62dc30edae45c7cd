"""A master and its slaves as real `twistd -n safesquid` processes on loopback addresses.

The master listens on 127.0.0.1 at a port chosen once per cluster (so it can be killed and
restarted where its slaves expect it); slaves take 127.0.0.2, 127.0.0.3, ... with their proxy
and portal on port 0 (read back from `<state>/run/listening.json`). Every wait polls with a
deadline; nothing sleeps for a fixed time.

Run as a script, this module is also a minimal control-plane client speaking the real protocol
(`probe` below), used to present the master with a slave it must refuse.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

import harness
from harness import HarnessError, wait_until

MASTER_HOST = "127.0.0.1"
ACTIVATION_KEY = "test-cluster-activation-key"


def slave_host(index: int) -> str:
    """The loopback address of the index-th slave (0 -> 127.0.0.2)."""
    return f"127.0.0.{2 + index}"


def free_port(host: str = MASTER_HOST) -> int:
    """A port with nothing listening on `host` right now (the master binds it moments later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(host: str, count: int) -> list[int]:
    """`count` different ports with nothing listening on `host` (all held open while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def write_key(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------------------------
# One node of the cluster, across restarts
# --------------------------------------------------------------------------------------------


class ClusterNode(harness.ExtendedLogReader):
    """A master or slave: its command line and state directory, and the process running now.

    `restart()` starts a new process on the same state directory (and, for the master, the
    same port); `kill()` is SIGKILL, `pause()`/`resume()` are SIGSTOP/SIGCONT.
    """

    def __init__(self, workdir: Path, name: str, role: str, host: str, args: list[str]) -> None:
        self.workdir = workdir
        self.name = name
        self.role = role
        self.host = host
        self.args = args
        self.node: harness.Node | None = None
        self.proxy: tuple[str, int] | None = None
        self.portal: tuple[str, int] | None = None

    # -- files -------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.workdir / f"{self.name}-state"

    @property
    def listening_file(self) -> Path:
        return self.state_dir / "run" / "listening.json"

    @property
    def extended_log(self) -> Path:
        return self.state_dir / "logs" / "extended.log"

    @property
    def cache_path(self) -> Path:
        return self.state_dir / "policy" / "current.json"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy[0]}:{self.proxy[1]}"

    # -- life cycle --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.node.pid

    def alive(self) -> bool:
        return self.node is not None and self.node.alive()

    def launch(self) -> None:
        """Start the process; returns at once (see `wait_listening` and `wait_health`)."""
        if self.alive():
            raise HarnessError(f"node {self.name} is already running (pid {self.pid})")
        # A process killed outright leaves its listening.json behind: never read a dead one's.
        self.listening_file.unlink(missing_ok=True)
        self.proxy = self.portal = None
        self.node = harness.start_node(self.workdir, policy=None, args=self.args, name=self.name,
                                       host=self.host, wait=False)

    def wait_listening(self, timeout: float = 30.0) -> dict[str, str]:
        def addresses():
            self._fail_if_exited("while starting")
            try:
                return json.loads(self.listening_file.read_text())
            except (OSError, ValueError):
                return None

        found = wait_until(addresses, timeout, f"{self.listening_file} of {self.name}")
        self.portal = _hostport(found["portal"])
        self.node.portal = self.portal
        if "proxy" in found:
            self.proxy = _hostport(found["proxy"])
            self.node.proxy = self.proxy
        return found

    def wait_health(self, expect: int, timeout: float = 30.0, check: Callable[[dict], bool] | None = None) -> dict:
        """Poll /health until it answers `expect` (and `check(body)` holds); returns the body."""
        last: list[Any] = [None]

        def matches():
            self._fail_if_exited("while waiting for /health")
            try:
                status, body = self.health()
            except OSError as e:
                last[0] = repr(e)
                return None
            last[0] = (status, body)
            if status == expect and body is not None and (check is None or check(body)):
                return body
            return None

        try:
            return wait_until(matches, timeout, f"/health = {expect} on {self.name}", interval=0.05)
        except HarnessError as e:
            raise HarnessError(f"{e}; last answer: {last[0]}") from None

    def start(self, expect_health: int | None = 200, timeout: float = 30.0) -> "ClusterNode":
        self.launch()
        try:
            self.wait_listening(timeout)
            if expect_health is not None:
                self.wait_health(expect_health, timeout)
        except BaseException:
            print(self.node.log_tails())
            self.kill()
            raise
        return self

    def restart(self, expect_health: int | None = 200, timeout: float = 30.0) -> "ClusterNode":
        if self.alive():
            self.stop()
        return self.start(expect_health, timeout)

    def _fail_if_exited(self, when: str) -> None:
        if self.node is None:
            raise HarnessError(f"node {self.name} was never started")
        if self.node.process.poll() is not None:
            raise HarnessError(f"node {self.name} exited with {self.node.process.returncode} {when}\n"
                               + self.node.log_tails())

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); a paused node is continued first."""
        if self.node is None:
            return None
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
        return self.node.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush, sockets closed by the kernel."""
        if self.node is None:
            return
        if self.alive():
            self.node.process.kill()
            self.node.process.wait(10)
        self.node.stop()  # forgets the dead process

    def signal(self, signum: int) -> None:
        self._fail_if_exited("before a signal")
        os.kill(self.pid, signum)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    # -- portal and logs ---------------------------------------------------------------------

    def health(self, timeout: float = 2.0) -> tuple[int, dict | None]:
        if self.portal is None:
            raise ConnectionRefusedError(f"{self.name} has no known portal address")
        return harness.fetch_health(self.portal, timeout)

    def extended_lines(self, predicate: Callable[[str], bool], since: int = 0) -> list[str]:
        """Event-log entries (lines starting with a timestamp) after `since` that match."""
        try:
            with open(self.extended_log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line[:1].isdigit() and predicate(line)]

    def wait_for_lines(self, predicate: Callable[[str], bool], count: int = 1, timeout: float = 10.0,
                       since: int = 0, what: str = "an extended.log line") -> list[str]:
        try:
            return wait_until(lambda: (found := self.extended_lines(predicate, since)) and len(found) >= count
                              and found, timeout, f"{count} x {what} in {self.name}'s extended.log")
        except HarnessError as e:
            tail = "\n".join(self.extended_text().splitlines()[-25:])
            raise HarnessError(f"{e}\nextended.log tail:\n{tail}") from None

    def log_tails(self, lines: int = 40) -> str:
        return self.node.log_tails(lines) if self.node is not None else f"{self.name}: never started"


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


class Cluster:
    """One master (127.0.0.1, fixed port) and any number of slaves, sharing an activation key."""

    def __init__(self, workdir: Path, key: str = ACTIVATION_KEY) -> None:
        self.workdir = workdir
        self.key_file = write_key(workdir / "activation.key", key)
        self.master_port = free_port(MASTER_HOST)
        self.master: ClusterNode | None = None
        self.slaves: list[ClusterNode] = []
        self.policy_path = workdir / "master-policy.json"
        self._token: str | None = None

    @property
    def master_address(self) -> str:
        return f"{MASTER_HOST}:{self.master_port}"

    # -- starting nodes ----------------------------------------------------------------------

    def start_master(self, policy: dict, *, keepalive: float = 2.0, args: Iterable[str] = (),
                     wait: bool = True) -> ClusterNode:
        harness.write_json_atomically(self.policy_path, policy)
        argv = [
            "--role", "master",
            "--portal", f"tcp:{self.master_port}:interface={MASTER_HOST}",
            "--policy", str(self.policy_path),
            "--activation-key-file", str(self.key_file),
            "--keepalive", f"{keepalive:g}",
            "--node-name", "master",
            *args,
        ]
        self.master = ClusterNode(self.workdir, "master", "master", MASTER_HOST, argv)
        self._provision_api_token()
        if wait:
            self.master.start(expect_health=200)
        else:
            self.master.launch()
        return self.master

    def slave(self, name: str | None = None, *, host: str | None = None, node_name: str | None = None,
              key_file: Path | None = None, keepalive: float = 2.0, poll_interval: float | None = None,
              master: str | None = None, args: Iterable[str] = ()) -> ClusterNode:
        """A slave's definition (not started): `start()` it, or `launch()` and wait yourself."""
        index = len(self.slaves)
        name = name or f"slave{index + 1}"
        argv = [
            "--role", "slave",
            "--master", master or self.master_address,
            "--node-name", node_name or name,
            "--activation-key-file", str(key_file or self.key_file),
            "--keepalive", f"{keepalive:g}",
            *(["--poll-interval", f"{poll_interval:g}"] if poll_interval else []),
            *args,
        ]
        node = ClusterNode(self.workdir, name, "slave", host or slave_host(index), argv)
        self.slaves.append(node)
        return node

    def add_slave(self, name: str | None = None, *, expect_health: int | None = 200,
                  timeout: float = 30.0, **kwargs) -> ClusterNode:
        """Define and start a slave; by default wait until it serves (it has the policy)."""
        return self.slave(name, **kwargs).start(expect_health=expect_health, timeout=timeout)

    def add_slaves(self, count: int, *, expect_health: int | None = 200, timeout: float = 30.0,
                   **kwargs) -> list[ClusterNode]:
        """Start `count` slaves at once (their start-ups overlap), then wait for each."""
        nodes = [self.slave(**kwargs) for _ in range(count)]
        for node in nodes:
            node.launch()
        for node in nodes:
            try:
                node.wait_listening(timeout)
                if expect_health is not None:
                    node.wait_health(expect_health, timeout)
            except BaseException:
                print(node.log_tails())
                raise
        return nodes

    def stop_all(self) -> None:
        for node in [*self.slaves, self.master]:
            if node is not None:
                try:
                    node.stop()
                except Exception as e:  # keep stopping the others
                    print(f"stopping {node.name}: {e!r}")

    # -- policy ------------------------------------------------------------------------------

    def push(self, policy: dict) -> float:
        """Write the master's policy file and SIGHUP it; returns time.monotonic() at the signal."""
        harness.write_json_atomically(self.policy_path, policy)
        sent = time.monotonic()
        self.master.signal(signal.SIGHUP)
        return sent

    # -- the master's API ----------------------------------------------------------------------

    def _provision_api_token(self) -> None:
        """An API token in the master's token store, as an administrator makes one in the portal
        (the store keeps only its digest; the secret stays with the tests)."""
        if self._token is not None:
            return
        from safesquid_tw.portal.tokens import TokenStore

        self.master.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _info, self._token = TokenStore(self.master.state_dir).create("cluster tests", by="integration tests")

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 20.0) -> tuple[int, dict]:
        """One call of the master's /api/v1 (plain HTTP: the master listens on loopback)."""
        conn = http.client.HTTPConnection(MASTER_HOST, self.master_port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self._token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            raise HarnessError(f"{method} {path} answered {response.status} with no JSON: {raw[:300]!r}") from None

    def cluster_view(self, timeout: float = 3.0) -> dict:
        status, body = self.api("GET", "/api/v1/cluster", timeout=timeout)
        if status != 200:
            raise HarnessError(f"GET /api/v1/cluster answered {status}: {body}")
        return body

    def send_task(self, node_name: str, task: str) -> tuple[int, dict]:
        return self.api("POST", f"/api/v1/cluster/{node_name}/tasks", {"task": task})

    def node_view(self, node_name: str) -> dict | None:
        for entry in self.cluster_view()["nodes"]:
            if entry["name"] == node_name:
                return entry
        return None

    def wait_view(self, node_name: str, check: Callable[[dict], bool], timeout: float,
                  what: str) -> dict:
        last: list[Any] = [None]

        def found():
            try:
                entry = self.node_view(node_name)
            except (OSError, HarnessError) as e:
                last[0] = repr(e)
                return None
            last[0] = entry
            return entry if entry is not None and check(entry) else None

        try:
            return wait_until(found, timeout, f"{what} ({node_name} in the cluster view)", interval=0.1)
        except HarnessError as e:
            raise HarnessError(f"{e}; last seen: {json.dumps(last[0], indent=1)}") from None

    def wait_connected(self, node_name: str, timeout: float = 15.0, connected: bool = True) -> dict:
        return self.wait_view(node_name, lambda e: e["connected"] is connected, timeout,
                              "connected" if connected else "not connected")

    # -- the master's report store -------------------------------------------------------------

    def report_rows(self, url_fragment: str) -> list[tuple[str, int, int, str, int]]:
        """(node, segment, seq, url, status) of the stored requests whose url has `url_fragment`.

        Read-only access to `<master state>/reports.sqlite3` (WAL: never blocks the writer)."""
        path = self.master.state_dir / "reports.sqlite3"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(
                "SELECT node, segment, seq, url, status FROM requests WHERE instr(url, ?) > 0",
                (url_fragment,),
            ).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            conn.close()


@pytest.fixture
def cluster(tmp_path):
    """A cluster that lives for one test; every node is stopped at the end."""
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def fetch(node: ClusterNode, url: str, timeout: float = 5.0) -> harness.RawResponse | None:
    """One GET through the node's proxy; None if the connection failed."""
    try:
        return harness.proxy_request(node, "GET", url, timeout=timeout)
    except (OSError, HarnessError):
        return None


def status_of(node: ClusterNode, url: str, timeout: float = 5.0) -> int | None:
    response = fetch(node, url, timeout)
    return None if response is None else response.status


# --------------------------------------------------------------------------------------------
# A control-plane client of our own: `probe`
# --------------------------------------------------------------------------------------------


def probe(master: str, *, key_file: Path, state_dir: Path, product: str | None = None,
          node_name: str = "probe", source: str | None = None, timeout: float = 20.0,
          misbehave: str | None = None, count: int = 1) -> dict:
    """Log in to the master as a slave would, with the given release number, in a subprocess.

    Returns what happened as {"stage": "hello"|"prove"|"admitted"|"connect", "refused": message}.
    `misbehave` breaks the protocol instead of logging in, `count` times in a row:
    "unknown-method" (a call the gate does not have, i.e. a call before login), "deep" (an
    over-deep argument), "refused-class" (an instance of a class the master must not rebuild),
    "second-hello" (a second key proof on one connection). The result then says
    {"answers": [error messages received], "closed": whether the master closed the connection}.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "probe", "--master", master,
            "--key-file", str(key_file), "--state-dir", str(state_dir), "--node-name", node_name,
            "--timeout", str(timeout)]
    if product:
        argv += ["--product", product]
    if source:
        argv += ["--source", source]
    if misbehave:
        argv += ["--misbehave", misbehave, "--count", str(count)]
    done = subprocess.run(argv, env=harness.node_environment(), capture_output=True, text=True,
                          timeout=timeout + 10, stdin=subprocess.DEVNULL)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise HarnessError(f"the probe said nothing useful (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}") from None


def _probe_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cluster_harness.py probe")
    parser.add_argument("--master", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--node-name", default="probe")
    parser.add_argument("--product", default=None)
    parser.add_argument("--source", default=None)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--misbehave", default=None)
    parser.add_argument("--count", type=int, default=1)
    opts = parser.parse_args(argv)
    sys.setrecursionlimit(100000)  # to build (and jelly) an over-deep argument

    from twisted.internet import defer, endpoints, reactor
    from twisted.spread import pb

    from safesquid_tw import __version__
    from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion, SlaveKeyProof
    from safesquid_tw.cluster.slave_side import SlaveClientFactory
    from safesquid_tw.cluster.tlsconfig import MasterClientCreator, MasterTrust, channel_binding
    from safesquid_tw.config import read_activation_key

    class ProbeMind(pb.Referenceable):
        def remote_ping(self):
            return None

    result: dict[str, Any] = {}
    host, _, port = opts.master.rpartition(":")
    kwargs = {"bindAddress": (opts.source, 0)} if opts.source else {}
    endpoint = endpoints.wrapClientTLS(
        MasterClientCreator(MasterTrust.for_state_dir(opts.state_dir), opts.master),
        endpoints.HostnameEndpoint(reactor, host, int(port), **kwargs),
    )

    def message(error: BaseException) -> str:
        text = str(getattr(error, "value", None) or error)
        return text

    class Thing(pb.Copyable):
        pass

    async def misbehave(broker, root) -> None:
        closed = []
        broker.notifyOnDisconnect(lambda: closed.append(True))
        calls = []
        for _ in range(opts.count):
            if opts.misbehave == "unknown-method":
                calls.append(root.callRemote("ship_log_batch", 1, 0, [b"{}"]))
            elif opts.misbehave == "deep":
                value: Any = []
                for _ in range(3000):
                    value = [value]
                calls.append(root.callRemote("hello", value, "x", "y", b"z"))
            elif opts.misbehave == "refused-class":
                calls.append(root.callRemote("hello", Thing(), "x", "y", b"z"))
            elif opts.misbehave == "second-hello":
                key = ClusterKey.from_activation_key(read_activation_key(opts.key_file))
                proof = SlaveKeyProof(key, NodeVersion(__version__), opts.node_name,
                                      channel_binding(broker.transport, "slave"))
                calls.append(root.callRemote("hello", *proof.hello_args()))
        answers = []
        for d in calls:
            try:
                answers.append({"ok": repr(await d)[:200]})
            except BaseException as e:
                answers.append({"error": message(e)[:300]})
        for _ in range(50):
            if closed:
                break
            wait = defer.Deferred()
            reactor.callLater(0.1, wait.callback, None)
            await wait
        result.update(stage="misbehaved", answers=answers, closed=bool(closed))
        if not closed:
            broker.transport.loseConnection()

    async def run() -> None:
        stage = "connect"
        try:
            if opts.misbehave == "refused-class":  # PB's permissive defaults, to send what ours refuse
                factory = pb.PBClientFactory()
                await endpoint.connect(factory)
                root = await factory.getRootObject()
                await misbehave(root.broker, root)
                return
            broker = await endpoint.connect(SlaveClientFactory())
            await broker.ready
            if opts.misbehave:
                await misbehave(broker, broker.remoteForName("root"))
                return
            root = broker.remoteForName("root")
            key = ClusterKey.from_activation_key(read_activation_key(opts.key_file))
            proof = SlaveKeyProof(key, NodeVersion(opts.product or __version__), opts.node_name,
                                  channel_binding(broker.transport, "slave"))
            stage = "hello"
            challenge = await root.callRemote("hello", *proof.hello_args())
            stage = "prove"
            answer = await root.callRemote("prove", proof.answer(challenge), ProbeMind())
            proof.verify_master(answer["proof"])
            result.update(stage="admitted")
            broker.transport.loseConnection()
        except BaseException as e:  # report whatever it was, as data
            result.update(stage=stage, refused=message(e), error_type=type(e).__name__)

    def finish(_ignored=None) -> None:
        if reactor.running:
            reactor.stop()

    def start() -> None:
        d = defer.ensureDeferred(run())
        d.addTimeout(opts.timeout, reactor)
        d.addErrback(lambda f: result.setdefault("refused", f"no answer: {f.getErrorMessage()}"))
        d.addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        sys.exit(_probe_main(sys.argv[2:]))
    sys.exit("usage: cluster_harness.py probe --master HOST:PORT --key-file F --state-dir D [...]")
