"""Two Ray nodes, serve_config.yaml deployed across them, the worker node killed under open streams.

Real machines are stood in for by Linux network namespaces on this one: the head and the worker
node each run in a namespace of their own (`rps-head-<N>`, `rps-worker-<N>`), joined by a bridge
(`rpsbr<N>`, 10.213.<N>.1) in the root namespace, so each node has its own address
(10.213.<N>.2 and .3) and its own ports. That is what makes the test honest: Ray 2.60 has one
cluster-wide bind host for the ingress (`http_options.host`, which HAProxy also uses for the
gRPC port), so two nodes on one network stack would both bind :50051 and either collide or share
it silently (SO_REUSEPORT), and so would the replicas' direct-ingress ports (40000 and up).
In namespaces every node binds exactly what it would on a machine of its own, serve_config.yaml
is deployed as it is but for a fixed replica count, and robots in this process reach each node's
ingress at the node's own address.

The namespaces get no default route: the nodes can reach each other, the bridge, and their own
loopback, nothing else (no other interface of this machine, no outside address).

Checked: one replica on each node; HAProxy (selected by serve_config.yaml's controller_options,
nothing in the nodes' environment) owning :50051 in each node and answering; robots connected
through the worker's ingress (their gRPC target lists both nodes, theirs first) move again
through the head's ingress when the worker node dies, holding (watchdog) whenever no fresh
action came in time, never running a chunk from before the gap, every call within its deadline.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import yaml

import tests.test_faults as faults
from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT
from tests.test_faults import PERIOD, TimedClient, check_robot_rode_out_the_kill, wait_until

pytestmark = pytest.mark.serve

VENV_BIN = REPO_ROOT / ".venv" / "bin"
CONFIG = REPO_ROOT / "serve_config.yaml"
LOCK_DIR = Path(tempfile.gettempdir()) / "rps-multinode-locks"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
GRPC_PORT = 50051  # serve_config.yaml's, checked below
WORKER_ROBOTS = 4  # connected through the worker node's ingress
HEAD_ROBOTS = 2  # through the head node's


def two_replica_config(path: Path) -> tuple[dict, int]:
    """serve_config.yaml with one change, written to `path`: a fixed `num_replicas: 2` in place of
    autoscaling. The test is about two replicas on two nodes when the worker dies; autoscaling
    starts at min_replicas (1, on one node) and adds the second only under load. Everything else
    (controller_options, proxy, HTTP and gRPC options, the app, its args and the other deployment
    options) is the repo's file as it is. Returns the config and the CPUs one replica takes."""
    config = yaml.safe_load(CONFIG.read_text())
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 2
    cpus = deployment.get("ray_actor_options", {}).get("num_cpus", 1)
    assert cpus >= 1 and float(cpus).is_integer(), f"replica num_cpus {cpus}: the test sizes each node to one replica"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config, int(cpus)


# --- network: a bridge and one namespace per node ---------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _claim_subnet(stack: ExitStack) -> int:
    """N for 10.213.N.0/24, held by a lock file (parallel runs never share one) and unused on this machine."""
    LOCK_DIR.mkdir(exist_ok=True)
    routes = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    links = _ip("link").stdout
    namespaces = _ip("netns", "list").stdout.split()
    for n in random.SystemRandom().sample(range(1, 255), 254):
        lock = open(LOCK_DIR / f"{n}.lock", "a")  # noqa: SIM115 - held open: it is the claim
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if f"10.213.{n}." in routes or f"rpsbr{n}:" in links or {f"rps-head-{n}", f"rps-worker-{n}"} & set(namespaces):
            lock.close()  # someone else's, or left by a run that was killed
            continue
        stack.callback(lock.close)
        return n
    raise RuntimeError("no free 10.213.N.0/24 for the test's network")


class Network:
    """rpsbr<N> (10.213.N.1/24) in the root namespace; per node a namespace on a veth into it."""

    def __init__(self, n: int, stack: ExitStack):
        self.n = n
        self.bridge = f"rpsbr{n}"
        self.head_ns, self.worker_ns = f"rps-head-{n}", f"rps-worker-{n}"
        self.head_ip, self.worker_ip = f"10.213.{n}.2", f"10.213.{n}.3"
        # Teardown runs even when setup fails half-way (each step is undone if it was done).
        stack.callback(self._teardown)
        proc = _ip("netns", "add", self.head_ns, check=False)
        if proc.returncode:
            if "permission denied" in proc.stderr.lower() or "not permitted" in proc.stderr.lower():
                pytest.skip(f"cannot create a network namespace (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
            raise RuntimeError(f"`ip netns add {self.head_ns}` failed: {proc.stderr.strip()}")
        _ip("netns", "add", self.worker_ns)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.213.{n}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for ns, ip, veth in ((self.head_ns, self.head_ip, f"rpsh{n}"), (self.worker_ns, self.worker_ip, f"rpsw{n}")):
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # No default route on purpose: the node reaches 10.213.N.0/24 and its loopback only.

    def veth(self, role: str) -> str:
        """The root-namespace end of a node's link."""
        return f"rpsh{self.n}" if role == "head" else f"rpsw{self.n}"

    def pids(self, ns: str) -> list[int]:
        proc = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def _teardown(self) -> None:
        for ns in (self.head_ns, self.worker_ns):
            kill_all(self.pids(ns))
        for ns in (self.head_ns, self.worker_ns):
            _ip("netns", "del", ns, check=False)  # its veth end goes with it, and so the pair ...
        for role in ("head", "worker"):  # ... unless something in the kernel still holds the namespace
            if _ip("link", "show", self.veth(role), check=False).returncode == 0:
                _ip("link", "del", self.veth(role), check=False)
        _ip("link", "del", self.bridge, check=False)


def signal_all(pids, groups, sig) -> None:
    """Send `sig` to these process groups (never this process's own) and processes."""
    own = os.getpgid(0)
    for group in set(groups) - {own}:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_all(pids, groups=()) -> float:
    """SIGKILL these processes and process groups, wait until they are gone; returns when the signals went out."""
    signalled_at = time.monotonic()
    signal_all(pids, groups, signal.SIGKILL)
    # Our own children (the `ray start`s) are reaped by their Popen; wait for the rest to be gone.
    psutil.wait_procs([p for p in map(_process, pids) if p and _ppid(p) != os.getpid()], timeout=10)
    return signalled_at


def _ppid(proc) -> int | None:
    try:
        return proc.ppid()
    except psutil.NoSuchProcess:
        return None


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# --- the Ray nodes ------------------------------------------------------------------


class Cluster:
    """`ray start --head` in one namespace, `ray start --address=...` in the other, as on two machines."""

    def __init__(self, net: Network, logs: Path, cpus_per_node: int, stack: ExitStack):
        self.net = net
        self.cpus = cpus_per_node
        self.logs = logs
        self.temp = Path(tempfile.mkdtemp(prefix=f"rpsmn{net.n}-"))  # short: Ray's socket paths must fit 107 bytes
        stack.callback(shutil.rmtree, self.temp, ignore_errors=True)
        # Token auth, Ray 2.60's default, stays on (it is what a real cluster runs with and what
        # `serve deploy` must get through), but with a token of this test's own: the user's
        # ~/.ray/auth_token is neither read nor created. On real machines every node and the
        # deploying shell need the same token (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
        token_path = self.temp / "auth_token"
        token_path.write_text(os.urandom(32).hex())
        token_path.chmod(0o600)
        self.token = token_path.read_text()
        # Nothing of this process's Ray/Serve environment leaks into the nodes (the test session's
        # own cluster, or a developer's shell, may have set some): the nodes must get the ingress
        # and everything else from serve_config.yaml alone.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
        self.procs: dict[str, subprocess.Popen] = {}
        self.haproxy_dirs: list[Path] = []
        self.cut: list[str] = []  # links cut by a silent death
        stack.callback(self._teardown)

    def _ray_start(self, role: str, ns: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"ray-start-{role}.log", "w")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
             # CPUs for exactly one replica per node (serve_config.yaml: num_cpus 1 each), so the
             # two replicas take one node each, as on two machines with one replica's worth each;
             # Serve's controller, proxies, HAProxy managers and app build task take no CPU.
             f"--num-cpus={self.cpus}", "--num-gpus=0", "--object-store-memory=100000000",
             f"--temp-dir={self.temp / role}", *args],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.procs[role] = proc
        return proc

    def start(self) -> None:
        net = self.net
        self._ray_start("head", net.head_ns, "--head", f"--node-ip-address={net.head_ip}", f"--port={GCS_PORT}",
                        # Reachable from the root namespace, where `serve deploy` runs ("anywhere
                        # that can reach the head"); in the namespace that is its own address only.
                        "--dashboard-host=0.0.0.0", f"--dashboard-port={DASHBOARD_PORT}")
        wait_until(lambda: self._alive("head") and self._nodes() is not None, 90, "the head node's dashboard")
        self._ray_start("worker", net.worker_ns, f"--address={net.head_ip}:{GCS_PORT}",
                        f"--node-ip-address={net.worker_ip}")
        wait_until(lambda: self._alive("worker") and len(self.alive_nodes()) == 2, 90, "the worker node to join")

    def _alive(self, role: str) -> bool:
        proc = self.procs[role]
        if proc.poll() is not None:
            raise RuntimeError(f"ray start ({role}) exited {proc.returncode}:\n"
                               + (self.logs / f"ray-start-{role}.log").read_text()[-3000:])
        return True

    # The head's dashboard, from the root namespace, with the cluster's token.
    def api(self, path: str, method: str = "GET", timeout: float = 10):
        request = urllib.request.Request(f"http://{self.net.head_ip}:{DASHBOARD_PORT}{path}", method=method,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")

    def _nodes(self):
        try:
            return self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except OSError:
            return None

    def alive_nodes(self) -> dict[str, str]:
        """node_ip -> node_id of the live nodes."""
        return {n["node_ip"]: n["node_id"] for n in self._nodes() or [] if n["state"] == "ALIVE"}

    def deploy(self, config: Path) -> None:
        """What a user runs: `serve deploy serve_config.yaml --address http://HEAD:8265`."""
        proc = subprocess.run(
            [str(VENV_BIN / "serve"), "deploy", str(config), "--address", f"http://{self.net.head_ip}:{DASHBOARD_PORT}"],
            check=False, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, f"serve deploy failed:\n{proc.stdout}\n{proc.stderr}"

    def application(self, name: str) -> dict | None:
        try:
            return self.api("/api/serve/applications/")["applications"].get(name)
        except OSError:
            return None

    def ns(self, role: str) -> str:
        return self.net.head_ns if role == "head" else self.net.worker_ns

    def tree_groups(self, role: str) -> tuple[set[int], set[int]]:
        """Every process of a node (its `ray start` tree and whatever lives in its namespace) and their groups."""
        pids = set(self.net.pids(self.ns(role)))
        # The `ray start` itself only while it is unreaped (after that its pid may be anyone's).
        popen = self.procs.get(role)
        proc = _process(popen.pid) if popen is not None and popen.poll() is None else None
        if proc:
            pids.add(proc.pid)
            pids |= {c.pid for c in proc.children(recursive=True)}
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        return pids, groups

    def kill(self, role: str, silent: bool = False) -> float:
        """The node dies: SIGKILL to its `ray start`, every process group it had (Ray's workers run in
        their own; HAProxy in its manager's) and every process in its namespace, all at once.
        `silent`: it goes silent instead, as a machine that loses power or its network: its link is
        cut and every process frozen (SIGSTOP), so nothing of it answers, not even its kernel with a
        reset; SIGKILLed at teardown, once the link is back (killed behind a cut link, its sockets
        would linger in the kernel, retrying, and keep its namespace alive for minutes).
        Returns when it died (the signals sent, or the link cut)."""
        pids, groups = self.tree_groups(role)
        if not silent:
            died_at = kill_all(pids, groups)
            if role in self.procs:
                self.procs[role].wait(timeout=10)
            return died_at
        veth = self.net.veth(role)
        died_at = time.monotonic()
        _ip("link", "set", veth, "down")
        self.cut.append(veth)
        signal_all(pids, groups, signal.SIGSTOP)
        return died_at

    def _teardown(self) -> None:
        for veth in self.cut:
            _ip("link", "set", veth, "up", check=False)
        for role in ("worker", "head"):
            self.kill(role)
        for d in self.haproxy_dirs:  # Serve's per-node HAProxy files (config, sockets, logs) in /tmp
            shutil.rmtree(d, ignore_errors=True)


# --- robots -------------------------------------------------------------------------


class ReplicaRecordingClient(TimedClient):
    """test_faults' robot client, also recording when each answer came and which replica sent it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.received: dict[str, float] = {}
        self.replica_of: dict[str, str] = {}

    def infer(self, request, timeout_s=None):
        chunk = super().infer(request, timeout_s)
        self.received[chunk.request_id] = time.monotonic()
        self.replica_of[chunk.request_id] = chunk.replica_id
        return chunk


def after_gap(r: faults.Robot, killed_at: float) -> list[float]:
    """Times of the robot's failed calls since the kill (its connection gap)."""
    return [t for t in list(r.client.failures) if t >= killed_at]


def moving_again(r: faults.Robot, killed_at: float, ticks: int = 10) -> bool:
    """The robot saw the gap and has applied `ticks` actions since its last failed call."""
    gap = after_gap(r, killed_at)
    return bool(gap) and sum(t > gap[-1] for t, _ in r.robot.applied[-ticks:]) == ticks


def check_gap(r: faults.Robot, killed_at: float, survivor: str) -> dict:
    """What must hold for every robot the kill cut off, whether or not its watchdog had to hold it:
    no chunk requested before a failed call ran (the client refuses answers from before a gap; the
    rest of a chunk that came in before the gap may run out, as designed), everything requested
    after the gap came from the surviving replica, what ran is what the server sent, no call
    outlived its deadline, and the robot was never without a fresh action for longer than its
    watchdog allows unless it held."""
    loop, client = r.loop, r.client
    failures = sorted(client.failures)
    acts = [rec for rec in loop.trace if rec.kind == "act"]
    for request_id in {rec.request_id for rec in acts}:
        sent, received = client.sent[request_id], client.received[request_id]
        assert not [f for f in failures if sent < f < received], f"chunk {request_id} from before a gap ran"
    gap = after_gap(r, killed_at)
    resumed = [rec for rec in acts if client.sent[rec.request_id] > gap[0]]
    assert resumed, "never moved again"
    last_fresh = max(rec.time for rec in acts if rec.time < resumed[0].time)
    assert {client.replica_of[rec.request_id] for rec in resumed} == {survivor}
    assert len(acts) == len(r.robot.applied)
    for rec, (_, action) in zip(acts, r.robot.applied):
        np.testing.assert_array_equal(action, client.returned[rec.request_id][rec.row])
    late = [(d, t) for d, t in client.calls if d > t + 0.5]
    assert not late, f"calls outlived their deadline: {late}"
    held = [t for t in loop.hold_times if last_fresh <= t < resumed[0].time]
    still = resumed[0].time - last_fresh
    if not held:
        assert still < faults.WATCHDOG_S + PERIOD + faults.SCHEDULING_SLACK_S, f"still {still:.3f} s, no hold"
    return {"held": bool(held), "still": still, "resumed": resumed[0].time - killed_at,
            "settled": gap[-1] - killed_at, "holds": sum(t >= killed_at - 1.0 for t in loop.hold_times)}


def ingress_connections() -> dict[tuple[str, int], int]:
    """This process's established TCP connections, by remote (IPv4 address, port). Each robot's
    client has a connection of its own (robot_client asks gRPC for no shared connection pool)."""
    out: dict[tuple[str, int], int] = {}
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.raddr:
            key = (c.raddr.ip.removeprefix("::ffff:"), c.raddr.port)
            out[key] = out.get(key, 0) + 1
    return out


def wait_healthy(address: str, timeout_s: float = 60) -> pb.HealthCheckResponse:
    """HealthCheck on a fresh connection every 0.2 s until the app answers healthy. (One channel
    polled instead would back off between refused connections, 1 s growing to 6 s, and report an
    ingress that came up late many seconds later still.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                health = pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=2)
                if health.healthy:
                    return health
                last = health
            except grpc.RpcError as err:
                last = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not healthy after {timeout_s} s: {last}")
        time.sleep(0.2)


def listener_names(ns: str, port: int) -> set[str]:
    """Names of the processes listening on TCP `port` in namespace `ns` (psutil reads only our own namespace's tables)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htlnp", f"sport = :{port}"],
                          capture_output=True, text=True, timeout=30, check=True)
    return set(re.findall(r'\(\("([^"]+)",pid=', proc.stdout))


# --- the test -----------------------------------------------------------------------


@pytest.mark.parametrize("death", ["processes", "silent"])
def test_two_nodes_worker_killed_under_streams(death, tmp_path, monkeypatch):
    """death="processes": every process of the worker node SIGKILLed, HAProxy included (its kernel
    resets the connections, so robots see the gap at once and most fail over before their watchdog
    fires); "silent": its link cut and its processes frozen (a machine that loses power or its
    network: nothing answers, robots find out from their deadline, and all of them hold)."""
    config_path = tmp_path / "serve_config.yaml"
    config, cpus = two_replica_config(config_path)
    assert config["grpc_options"]["port"] == GRPC_PORT and config["proxy_location"] == "EveryNode"
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    monkeypatch.setattr(faults, "TimedClient", ReplicaRecordingClient)  # what faults.Robot.start builds

    with ExitStack() as stack:
        net = Network(_claim_subnet(stack), stack)
        cluster = Cluster(net, tmp_path, cpus, stack)
        started = time.monotonic()
        cluster.start()
        nodes = cluster.alive_nodes()
        assert set(nodes) == {net.head_ip, net.worker_ip}, nodes
        cluster.haproxy_dirs = [Path(tempfile.gettempdir()) / "haproxy-serve" / node_id for node_id in nodes.values()]
        up_at = time.monotonic()

        # serve_config.yaml (with 2 fixed replicas), deployed the way the README says.
        cluster.deploy(config_path)
        deploy_returned_at = time.monotonic()

        def running():
            status = cluster.application(app["name"])
            if status and status["status"] == "DEPLOY_FAILED":
                raise AssertionError(f"deploy failed: {status['message']}")
            replicas = (status or {}).get("deployments", {}).get(deployment["name"], {}).get("replicas", [])
            return status and status["status"] == "RUNNING" and len(replicas) == 2 and replicas

        wait_until(running, 120, "the application to be RUNNING with 2 replicas")
        running_at = time.monotonic()
        replicas = running()
        # 1. One replica on each node.
        replica_node = {r["replica_id"]: r["node_ip"] for r in replicas}
        assert sorted(replica_node.values()) == sorted([net.head_ip, net.worker_ip]), replicas
        head_replica = next(rid for rid, ip in replica_node.items() if ip == net.head_ip)
        addresses = {role: f"{ip}:{GRPC_PORT}" for role, ip in (("head", net.head_ip), ("worker", net.worker_ip))}
        # 2. Each node's ingress answers on its own address, and it is HAProxy (chosen by the
        #    config's controller_options: the nodes' environment has no RAY_SERVE_* variable).
        answering = {}
        for role, address in addresses.items():
            wait_healthy(address)
            answering[role] = time.monotonic() - up_at
            # (polled: Serve reloads HAProxy as replicas come up, and mid-reload the socket may show no owner)
            wait_until(lambda: listener_names(cluster.ns(role), GRPC_PORT) == {"haproxy"}, 15,  # noqa: B023
                       f"HAProxy to own :{GRPC_PORT} on the {role} node")

        # 3. Robots through each node's ingress. A robot's gRPC target lists both nodes, its own
        #    first: pick_first connects to the first that answers, and on a reconnect tries
        #    them in order again, so when its node is gone it lands on the other.
        targets = {role: f"ipv4:{addresses[role]},{addresses[other]}"
                   for role, other in (("head", "worker"), ("worker", "head"))}
        robots = {"worker": [], "head": []}
        try:
            for i in range(WORKER_ROBOTS + HEAD_ROBOTS):
                role = "worker" if i < WORKER_ROBOTS else "head"
                robots[role].append(faults.Robot.start(targets[role], seed=i))
            everyone = robots["worker"] + robots["head"]
            wait_until(lambda: all(len(r.robot.applied) >= faults.HZ for r in everyone), 30,
                       "a second of motion on every robot")
            before = ingress_connections()
            assert before.get((net.worker_ip, GRPC_PORT)) == WORKER_ROBOTS, before
            assert before.get((net.head_ip, GRPC_PORT)) == HEAD_ROBOTS, before
            served_before = {rid for r in everyone for rid in list(r.client.replica_of.values())}
            assert served_before == set(replica_node), "both replicas served robots before the kill"

            killed_at = cluster.kill("worker", silent=death == "silent")
            wait_until(lambda: all(after_gap(r, killed_at) for r in robots["worker"]), 30,
                       "every robot on the worker's ingress to see the gap")
            wait_until(lambda: all(moving_again(r, killed_at) for r in everyone if after_gap(r, killed_at)), 60,
                       "every robot the kill cut off to move again")
            time.sleep(1.0)
            after = ingress_connections()
        finally:
            stats = {role: [r.finish() for r in rs] for role, rs in robots.items()}
        # After the gap, every robot is connected to the head's ingress, none to the worker's.
        assert not after.get((net.worker_ip, GRPC_PORT)), after
        assert after.get((net.head_ip, GRPC_PORT)) == WORKER_ROBOTS + HEAD_ROBOTS, after

        gaps, holds = [], []
        for role in ("worker", "head"):
            for r, s in zip(robots[role], stats[role]):
                if not after_gap(r, killed_at):
                    assert role == "head", "a robot on the worker's ingress never noticed the kill"
                    continue  # its stream ran on the head's replica: the kill never touched it
                gaps.append({"role": role, **check_gap(r, killed_at, head_replica)})
                if gaps[-1]["held"]:
                    # Held within a period of its watchdog deadline, nothing moved it while held, and
                    # what moved it after came from a request sent after the gap (test_faults' checks).
                    holds.append(check_robot_rode_out_the_kill(r, s, killed_at))
        if death == "silent":
            assert all(g["held"] for g in gaps), "with nothing answering, every robot cut off must hold"
        failures = sum(sum(s.failures.values()) for ss in stats.values() for s in ss)
        ms = lambda key: f"{min(g[key] for g in gaps) * 1e3:.0f}-{max(g[key] for g in gaps) * 1e3:.0f} ms"
        print(f"\n[{death}] two nodes up in {up_at - started:.1f} s; `serve deploy` returned in "
              f"{deploy_returned_at - up_at:.1f} s, app RUNNING {running_at - up_at:.1f} s, the head's ingress answering "
              f"{answering['head']:.1f} s, the worker's {answering['worker']:.1f} s after it started. Worker node killed under {WORKER_ROBOTS + HEAD_ROBOTS} streams "
              f"({WORKER_ROBOTS} through its ingress): {len(gaps)} robots cut off, {sum(g['held'] for g in gaps)} "
              f"held" + (f" (at worst {max(h[0] for h in holds) * 1e3:.0f} ms past the watchdog deadline)" if holds else "")
              + f"; without a fresh action for {ms('still')}; first fresh action through the head's ingress "
              f"{ms('resumed')} after the kill; last failed call {ms('settled')} after it; {failures} failed calls")
        for g in gaps:
            print(f"  robot on the {g['role']}'s ingress: {g['holds']} holds, still {g['still'] * 1e3:.0f} ms, moving "
                  f"at +{g['resumed']:.2f} s, last failure at +{g['settled']:.2f} s")
