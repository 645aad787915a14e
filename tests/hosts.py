"""Several "hosts" on one Linux machine: network namespaces on a private bridge, for multi-node tests.

    with Hosts(3) as hosts:                      # 10.77.<net>.1, .2, .3, each its own network namespace
        hosts[0].popen(["ray", "start", "--head", ...])
        hosts[1].run(["ping", "-c1", hosts[0].ip])
        hosts[2].popen([...], private_mounts={run_dir: "tmpfs"})   # an empty tmpfs over run_dir, for this process only
                                                                   # ("tmpfs-ro": empty and read-only)

The bridge lives in a namespace of its own (the "switch"), so the machine's own network sees nothing: no
interface, no route, no address. Every host gets a loopback and one veth into the switch, with a default
route into it (the switch has no uplink, so a packet for any other address goes nowhere); the addresses are
10.77.N.0/24 with N chosen per instance (free among this machine's namespaces), contacted only from inside.

Teardown (``close``, also on an exception in the ``with`` block and at interpreter exit) kills every process
inside those namespaces (``ip netns pids``: SIGTERM, then SIGKILL), including any a test lost track of, and
deletes the namespaces; the veths and the bridge go with them. Nothing outside the namespaces is touched.
Namespaces left by a process that was killed outright (no teardown ran) are removed by the next ``Hosts``:
their names carry the id of the process that made them.

``unavailable()`` says why namespaces cannot be made here (not root, no ``ip``, no ``unshare``, a sandbox that
refuses ``ip netns add``), for ``pytest.skip``.
"""
from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

SUBNET_PREFIX = "10.77"
PREFIX = "catdog-hosts-"
"""Every namespace this module makes is named ``catdog-hosts-<pid of the making process>-<random>-<h1|sw..>``."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _used_subnets() -> set[int]:
    """Third octets of 10.77.N.x already used by namespaces on this machine (other tests running now)."""
    used = set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        out = _ip("-n", name, "-4", "-o", "addr", check=False).stdout
        for word in out.split():
            if word.startswith(SUBNET_PREFIX + "."):
                used.add(int(word.split(".")[2]))
    return used


@dataclass
class Host:
    """One namespace host: its name, address, and the processes started in it."""

    netns: str
    ip: str
    index: int
    env: dict = field(default_factory=dict)
    procs: list = field(default_factory=list)

    def command(self, argv: Sequence[str], private_mounts: Mapping[str, str] | None = None) -> list[str]:
        """``argv`` run in this host; with ``private_mounts`` ({folder: "tmpfs" or "tmpfs-ro"}) inside its own
        mount namespace, an empty tmpfs (read-only with ``tmpfs-ro``) mounted over each folder (made if missing;
        other processes see the folder as it is)."""
        argv = [str(a) for a in argv]
        if private_mounts:
            for kind in private_mounts.values():
                if kind not in ("tmpfs", "tmpfs-ro"):
                    raise ValueError(f"private_mounts: {kind!r} is not 'tmpfs' or 'tmpfs-ro'")
            mounts = " && ".join(f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs -o size=256m"
                                 f"{',ro' if kind == 'tmpfs-ro' else ''} catdog-empty {shlex.quote(str(p))}"
                                 for p, kind in private_mounts.items())
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"{mounts} && exec \"$@\"", "sh", *argv]
        return ["ip", "netns", "exec", self.netns, *argv]

    def _env(self, env: Mapping[str, str] | None) -> dict:
        return {**os.environ, **self.env, **(env or {})}

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300,
            check: bool = False, private_mounts: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run to completion in this host; output captured as text."""
        result = subprocess.run(self.command(argv, private_mounts), env=self._env(env), capture_output=True,
                                text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.netns}: {' '.join(map(str, argv))} exited {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log: str | os.PathLike | None = None,
              private_mounts: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start in this host in the background (stdout and stderr to ``log`` when given); killed on teardown."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(self.command(argv, private_mounts), env=self._env(env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process inside this host's network namespace, whoever started it."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_all(self, grace: float = 5.0, hard: bool = False) -> None:
        """SIGTERM every process in this namespace, then SIGKILL what is left after ``grace`` seconds; with
        ``hard``, SIGKILL at once (a host that crashes)."""
        steps = [(signal.SIGKILL, 5.0)] if hard else [(signal.SIGTERM, grace), (signal.SIGKILL, 5.0)]
        for sig, wait in steps:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class Hosts:
    """``n`` namespace hosts on one private bridge; a context manager (see the module docstring)."""

    def __init__(self, n: int, env: Mapping[str, str] | None = None):
        reason = unavailable()
        if reason:
            raise RuntimeError(f"namespace hosts unavailable: {reason}")
        clean_stale()
        self.tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:4]}-"
        self.switch = f"{self.tag}sw"
        self.hosts: list[Host] = []
        self._closed = False
        atexit.register(self.close)
        try:
            net = min(set(range(1, 250)) - _used_subnets())
            self.subnet = f"{SUBNET_PREFIX}.{net}"
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(n):
                name = f"{self.tag}h{i + 1}"
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
                # both ends made in the switch, one moved into the host and renamed eth0
                _ip("-n", self.switch, "link", "add", f"p{i + 1}", "type", "veth", "peer", "name", f"e{i + 1}")
                _ip("-n", self.switch, "link", "set", f"e{i + 1}", "netns", name)
                _ip("-n", name, "link", "set", f"e{i + 1}", "name", "eth0")
                _ip("-n", self.switch, "link", "set", f"p{i + 1}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i + 1}", "up")
                ip = f"{self.subnet}.{i + 1}"
                _ip("-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                # a default route into the switch, which has no way out: programs that find "their" address by
                # routing towards a public one (Ray does, with a UDP socket) find eth0's; nothing leaves the switch
                _ip("-n", name, "route", "add", "default", "dev", "eth0")
                self.hosts.append(Host(name, ip, i, dict(env or {})))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self):
        return iter(self.hosts)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_reachable(self, port: int = 47999, timeout: float = 20) -> None:
        """Every host reaches the first over TCP (a one-shot listener there; python, since ping may be absent)."""
        import sys
        server = self.hosts[0].popen([sys.executable, "-c",
                                      "import socket,sys;s=socket.create_server(('0.0.0.0',int(sys.argv[1])));"
                                      "[s.accept()[0].close() for _ in range(int(sys.argv[2]))]",
                                      str(port), str(len(self.hosts) - 1)])
        client = ("import socket,sys,time\nend=time.time()+float(sys.argv[3])\nwhile True:\n try:\n"
                  "  socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2).close();break\n"
                  " except OSError:\n  assert time.time()<end,'unreachable'\n  time.sleep(0.2)")
        for host in self.hosts[1:]:
            host.run([sys.executable, "-c", client, self.hosts[0].ip, str(port), str(timeout)], check=True,
                     timeout=timeout + 10)
        server.wait(timeout=timeout)

    def close(self) -> None:
        """Kill every process in the hosts and delete the namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        everyone = Host(self.hosts[0].netns, "", 0) if self.hosts else None
        if everyone is not None:  # all hosts at once: one grace period, not one per host
            everyone.pids = lambda: [pid for host in self.hosts for pid in host.pids()]
            everyone.procs = [proc for host in self.hosts for proc in host.procs]
            everyone.kill_all()
        for host in self.hosts:
            _ip("netns", "del", host.netns, check=False)
        if any(line.split()[:1] == [self.switch] for line in _ip("netns", "list", check=False).stdout.splitlines()):
            _ip("netns", "del", self.switch, check=False)
        atexit.unregister(self.close)


def clean_stale() -> list[str]:
    """Delete the namespaces (and kill their processes) of Hosts whose creating process is gone without
    tearing down (SIGKILLed pytest). Their names carry that process's id: catdog-hosts-<pid>-<tag>-..."""
    stale = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            Host(name, "", 0).kill_all(grace=1)
            _ip("netns", "del", name, check=False)
            stale.append(name)
    return stale


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces whose name starts with ``tag`` (for a test that checks teardown)."""
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
            if line.split() and line.split()[0].startswith(tag)]
