"""Several hosts on one machine (network namespaces, tests/hosts.py): a Ray cluster with a head and two workers,
one of which sees an empty tmpfs where the run directory and data root are, and Accelerate across two hosts.

    pytest -m multinode            # root only; skipped, with the reason, where namespaces cannot be made

The tests share one set of three hosts (module scope) and run in file order: the helper's own checks, the
two-host Accelerate runs, then the Ray cluster (job submission of the sweep, the top-activation search and the
concepts, a Tune sweep killed and resumed, and last a worker host killed in the middle of a sweep).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

import hosts as hostlib
from catdog.config import load_config, save_config
from catdog.store import FeatureStore
from catdog.sweep import read_results
from catdog.topact import draw_feature
from conftest import REPO, make_image_folder, tiny_config
from synthetic_store import write_rankings, write_store
from test_sweep import CLASSIFIERS, DIM, INFORMATIVE, accuracies, expected_accuracies, split_arrays

pytestmark = [pytest.mark.multinode,
              pytest.mark.skipif(hostlib.unavailable() is not None,
                                 reason=f"namespace hosts: {hostlib.unavailable()}")]

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
ACCELERATE = str(BIN / "accelerate")
GCS_PORT, DASHBOARD_PORT = 6379, 8265
# fast node-death detection, so a killed host is noticed in seconds rather than a minute
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
          "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


@pytest.fixture(scope="module")
def base() -> Path:
    """Everything the module writes: ``work/`` (runs and data; hidden from host 3's Ray), Ray temp folders, logs."""
    folder = Path(tempfile.mkdtemp(prefix="cdmn", dir="/tmp"))  # short: Ray's socket paths live under it
    (folder / "work").mkdir()
    (folder / "logs").mkdir()
    yield folder
    if os.environ.get("CATDOG_MULTINODE_LOGS"):  # keep the hosts' logs and transcripts (for a report)
        shutil.copytree(folder / "logs", os.environ["CATDOG_MULTINODE_LOGS"], dirs_exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts(base):
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "PYTHONUNBUFFERED": "1"}
    with hostlib.Hosts(3, env=env) as made:
        for host in made:
            host.env["RAY_TMPDIR"] = str(base / f"ray{host.index + 1}")  # this host's Ray records and sessions
        made.check_reachable()
        yield made


def log_of(base: Path, name: str) -> str:
    path = base / "logs" / name
    return path.read_text(errors="replace") if path.exists() else ""


# ---------------------------------------------------------------------------------------------------- the helper

def test_hosts_are_separate_and_torn_down_even_after_a_failure(hosts, base, tmp_path):
    assert [h.ip for h in hosts] == [f"{hosts.subnet}.{i}" for i in (1, 2, 3)]
    assert hosts[1].run(["cat", "/proc/net/if_inet6"]).returncode == 0
    # only lo and eth0 inside; the machine's own interfaces are not there
    links = hosts[1].run(["ip", "-o", "link"]).stdout
    assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == ["lo", "eth0"]
    # a private tmpfs over a folder: empty for that process only
    (tmp_path / "secret").write_text("x")
    seen = hosts[2].run(["ls", "-A", str(tmp_path)], private_mounts={str(tmp_path): "tmpfs"}, check=True)
    assert seen.stdout == ""
    write = hosts[2].run(["touch", str(tmp_path / "new")], private_mounts={str(tmp_path): "tmpfs-ro"})
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert (tmp_path / "secret").read_text() == "x"

    with pytest.raises(RuntimeError, match="boom"):
        with hostlib.Hosts(2) as doomed:
            tag = doomed.tag
            sleeper = doomed[1].popen(["sleep", "600"])
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) is not None
    assert hostlib.leftover_namespaces(tag) == []


# ---------------------------------------------------------------------------------------------------- Accelerate

@pytest.fixture(scope="module")
def accel_data(base) -> Path:
    return make_image_folder(base / "shared-data", {"train": 24, "test": 7, "val": 5})


def accel_config(base: Path) -> Path:
    path = base / "tiny.yaml"
    # one thread per process on both layouts: the same arithmetic, so the same weights
    save_config(tiny_config("train.cpu_threads=1", "optim.epochs=2", "optim.lr=0.001"), path)
    return path


def launch(hosts, base, name: str, machines: list[int], script_args: list[str], port: int, timeout=400):
    """``accelerate launch`` of a job on ``machines`` (host indexes), one process per host, or two processes on
    one host when a single machine is given; waits, and returns each host's log."""
    return finish(name, *start_launch(hosts, base, name, machines, script_args, port), timeout=timeout)


def start_launch(hosts, base, name: str, machines: list[int], script_args: list[str], port: int):
    procs, logs = [], []
    for rank, h in enumerate(machines):
        host = hosts[h]
        if len(machines) == 1:
            topology = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
                        str(port)]
        else:
            topology = ["--multi_gpu", "--num_processes", str(len(machines)), "--num_machines", str(len(machines)),
                        "--machine_rank", str(rank), "--main_process_ip", hosts[machines[0]].ip,
                        "--main_process_port", str(port), "--same_network"]
        log = base / "logs" / f"{name}-host{h + 1}.log"
        logs.append(log)
        procs.append(host.popen([ACCELERATE, "launch", *topology, *script_args], log=log,
                                env={"GLOO_SOCKET_IFNAME": "eth0" if len(machines) > 1 else "lo",
                                     "CATDOG_PROGRESS_SECONDS": "1000"}))
    return procs, logs


def finish(name: str, procs: list, logs: list, timeout: float = 400) -> list[str]:
    deadline = time.monotonic() + timeout
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"{name} timed out\n" + "\n".join(l.read_text() for l in logs))
        assert proc.returncode == 0, f"{name}: {log.name} exit {proc.returncode}\n{log.read_text()}"
    return [log.read_text() for log in logs]


def test_accelerate_train_and_extract_across_two_hosts(hosts, base, accel_data):
    config = accel_config(base)
    one, two = base / "work" / "one-host", base / "work" / "two-hosts"
    train = [str(REPO / "jobs" / "train.py"), "--config", str(config), "--data", str(accel_data)]
    # both layouts at once (they share nothing but the data; each is deterministic)
    reference = start_launch(hosts, base, "train-one-host", [0], [*train, "--out", str(one)], 29500)
    logs = launch(hosts, base, "train-two-hosts", [0, 1], [*train, "--out", str(two)], 29501)
    finish("train-one-host", *reference)
    a, b = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    print(f"one host, 2 processes: test {a['best_test_accuracy']:.4f} val {a['val_accuracy']:.4f}; "
          f"two hosts, 1 process each: test {b['best_test_accuracy']:.4f} val {b['val_accuracy']:.4f}")
    assert b["num_processes"] == a["num_processes"] == 2
    assert (b["best_test_accuracy"], b["val_accuracy"], b["best_epoch"]) == \
        (a["best_test_accuracy"], a["val_accuracy"], a["best_epoch"])
    assert b["test_images"] == a["test_images"] == 14 and b["val_images"] == a["val_images"] == 10  # each once
    assert (two / "best.safetensors").read_bytes() == (one / "best.safetensors").read_bytes()  # the same weights
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(m["images_per_rank"] == [24, 24] for m in metrics)  # 48 train images: half on each host
    assert metrics == [{**m, **{k: metrics[i][k] for k in m if "second" in k}}
                       for i, m in enumerate(json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines())]
    assert all("Traceback" not in log for log in logs)

    extract = [str(REPO / "jobs" / "extract.py"), "--data", str(accel_data)]
    launch(hosts, base, "extract-two-hosts", [0, 1], [*extract, "--run", str(two), "extract.shard_size=8"], 29502)
    manifest = json.loads((two / "features" / "manifest.json").read_text())
    files = sorted(shard["file"] for shard in manifest["shards"])
    assert len(files) == 6 + 2 + 2  # 48, 14 and 10 images in shards of 8, dealt to the two hosts' processes
    store = FeatureStore(two / "features", verify=True)
    assert {split: store.num_rows(split) for split in ("train", "test", "val")} == {"train": 48, "test": 14, "val": 10}
    assert sorted(store.row_ids("train").tolist()) == list(range(48))


# ---------------------------------------------------------------------------------------------------- ray up

def start_sshd(hosts, base: Path, token: str) -> Path:
    """sshd on every host (a key made here; root's login), each in its own PID namespace with a private home.

    The private home (bound over /root, with the real /root/.pyenv inside it, where this venv's Python lives)
    holds what a node's own disk would: .bashrc (the venv on PATH, token authentication, Ray's temp folder),
    ~/.ray/auth_token, and what ``ray up`` syncs. The PID namespace confines the ``ray stop`` that the cluster
    config's start commands and ``ray down`` run to that host's processes.
    """
    ssh = base / "ssh"
    ssh.mkdir()
    for name in ("key", "hostkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name)], check=True)
    shutil.copy(ssh / "key.pub", ssh / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    for host in hosts:
        home = base / f"home{host.index + 1}"
        (home / ".ray").mkdir(parents=True)
        (home / ".pyenv").mkdir()
        (home / ".ray" / "auth_token").write_text(token)
        (home / ".bashrc").write_text(f"export PATH={BIN}:$PATH RAY_AUTH_MODE=token RAY_TMPDIR=/root/rt "
                                      "RAY_USAGE_STATS_ENABLED=0\n")
        config = ssh / f"sshd{host.index + 1}.conf"
        config.write_text(f"ListenAddress {host.ip}\nHostKey {ssh / 'hostkey'}\nPidFile {ssh}/sshd{host.index + 1}.pid\n"
                          f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        host.popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                    f"mount --bind /root/.pyenv {home}/.pyenv && mount --rbind {home} /root && "
                    f"exec /usr/sbin/sshd -D -e -f {config}"], log=base / "logs" / f"sshd{host.index + 1}.log")
    return ssh / "key"


def cluster_yaml(hosts, key: Path, out: Path) -> Path:
    """configs/ray-cluster.yaml for these hosts: their addresses, root with the test's key, catdog already
    installed (this venv) instead of the pip setup, one CPU and a small object store per node."""
    config = yaml.safe_load((REPO / "configs" / "ray-cluster.yaml").read_text())
    config["provider"].update(head_ip=hosts[0].ip, worker_ips=[h.ip for h in hosts[1:]])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    config["file_mounts"] = {"~/catdog": str(REPO)}
    config["setup_commands"] = ["python -c 'import catdog, ray; print(\"catdog and ray\", ray.__version__)'"]
    small = " --num-cpus=1 --object-store-memory=200000000 --disable-usage-stats"
    config["head_start_ray_commands"] = [c.replace("ray start --head", "ray start --head" + small)
                                         for c in config["head_start_ray_commands"]]
    config["worker_start_ray_commands"] = [c.replace("ray start", "ray start" + small)
                                           for c in config["worker_start_ray_commands"]]
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.mark.skipif(not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()) or not shutil.which("rsync"),
                    reason="needs openssh-server and rsync (apt-get install openssh-server rsync)")
def test_ray_up_submit_down_with_the_local_provider_over_ssh(base):
    """``ray up configs/ray-cluster.yaml`` (Ray's local provider, SSH to three namespace hosts), ``ray submit``
    of jobs/sweep.py, ``ray down``: the cluster launcher's path, run from host 1."""
    token = uuid.uuid4().hex
    before = set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray_ssh_*/*"))
    folder = base / "rayup"
    (folder / "logs").mkdir(parents=True)
    with hostlib.Hosts(3) as machines:
        machines.check_reachable()
        key = start_sshd(machines, folder, token)
        config = cluster_yaml(machines, key, folder / "cluster.yaml")
        client = machines[0]
        (folder / "client").mkdir()
        env = {"HOME": str(folder / "client"), "RAY_TMPDIR": str(folder / "client"), "TMPDIR": str(folder / "client"),
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
               "RAY_USAGE_STATS_ENABLED": "0"}
        transcript = []

        def ray_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            done = client.run([RAY, *args], env=env, timeout=timeout)
            transcript.append(f"$ ray {' '.join(args)}\n[exit {done.returncode}]\n{done.stdout}{done.stderr}")
            (base / "logs" / "ray-up-transcript.log").write_text("\n".join(transcript))
            assert done.returncode == 0, transcript[-1][-6000:]
            return done

        try:
            ray_cli("up", "-y", "--no-config-cache", str(config))
            ray_cli("exec", str(config), "python -c 'import ray, time; ray.init(logging_level=\"ERROR\"); "
                    "end = time.time() + 180\nwhile len([n for n in ray.nodes() if n[\"Alive\"]]) < 3 and "
                    "time.time() < end: time.sleep(1)\nprint(\"alive nodes:\", len([n for n in ray.nodes() "
                    "if n[\"Alive\"]]))'", timeout=240)
            assert "alive nodes: 3" in transcript[-1], transcript[-1][-3000:]
            run = make_sweep_run(base, "ray-submit")
            submitted = ray_cli("submit", str(config), str(REPO / "jobs" / "sweep.py"), "--", "--run", str(run))
            rows = read_results(run / "sweep" / "results.csv")
            assert accuracies(rows) == expected_accuracies(run)
            assert len({row["node"] for row in rows}) >= 2, submitted.stdout
            assert "cells per node:" in submitted.stdout
            ray_cli("down", "-y", str(config))
        finally:
            for path in sorted((set(Path("/tmp").glob("ray_ssh_*/*")) | set(Path("/tmp").glob("ray_ssh_*"))) - before,
                               reverse=True):
                shutil.rmtree(path, ignore_errors=True)  # ssh control sockets Ray keeps in /tmp for this cluster


# ---------------------------------------------------------------------------------------------------- Ray cluster

@pytest.fixture(scope="module")
def cluster(hosts, base):
    """Ray head on host 1 (no CPUs of its own: trials and tasks land on workers), workers on hosts 2 and 3 (one
    CPU each); host 3's Ray runs in its own mount namespace with an empty, read-only tmpfs over ``base/work``
    (runs and data): any read or write of them there fails."""
    head, ip = hosts[0], hosts[0].ip
    common = ["--block", "--disable-usage-stats", "--object-store-memory=200000000"]
    head.popen([RAY, "start", "--head", f"--node-ip-address={ip}", f"--port={GCS_PORT}", "--num-cpus=0",
                "--include-dashboard=true", f"--dashboard-host={ip}", f"--dashboard-port={DASHBOARD_PORT}",
                f"--temp-dir={base / 'ray1'}", *common], env=HEALTH, log=base / "logs" / "ray-head.log")
    wait_for(lambda: head.run([RAY, "job", "list", "--address", f"http://{ip}:{DASHBOARD_PORT}"],
                              timeout=60).returncode == 0, 180, "the head's dashboard", base)
    for host, private in ((hosts[1], None), (hosts[2], {str(base / "work"): "tmpfs-ro"})):
        host.popen([RAY, "start", f"--address={ip}:{GCS_PORT}", f"--node-ip-address={host.ip}", "--num-cpus=1",
                    f"--temp-dir={base / f'ray{host.index + 1}'}", *common], env=HEALTH,
                   log=base / "logs" / f"ray-worker{host.index + 1}.log", private_mounts=private)
    nodes = head.run([sys.executable, "-c", textwrap.dedent(f"""
        import ray, time
        ray.init(address="{ip}:{GCS_PORT}", logging_level="ERROR")
        end = time.time() + 180
        while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.time() < end:
            time.sleep(1)
        print(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]))
        """)], timeout=240, check=True)
    assert nodes.stdout.strip().splitlines()[-1] == str(sorted(h.ip for h in hosts)), nodes.stdout + nodes.stderr
    yield hosts
    # the hosts fixture kills everything in the namespaces


def wait_for(condition, timeout: float, what: str, base: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up in {timeout} s\n{log_of(base, 'ray-head.log')}")
        time.sleep(2)


def submit(cluster, base, name: str, *argv: str, timeout: float = 300) -> str:
    """``ray job submit`` from host 1 to the head's dashboard (token authentication); returns the job's output."""
    head = cluster[0]
    job = head.run([RAY, "job", "submit", "--address", f"http://{head.ip}:{DASHBOARD_PORT}", "--",
                    sys.executable, *argv], timeout=timeout)
    (base / "logs" / f"{name}.log").write_text(job.stdout + job.stderr)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout + job.stderr
    return job.stdout


def make_sweep_run(base: Path, name: str, ks: str = "[1, 2, 4, 8, all]") -> Path:
    run = base / "work" / name
    splits = {"train": split_arrays(60, 0), "test": split_arrays(30, 1), "val": split_arrays(30, 2)}
    write_store(run / "features", splits, ["cat", "dog"], shard_size=25)
    order = [INFORMATIVE] + [f for f in range(DIM) if f != INFORMATIVE]
    write_rankings(run / "forest", order, {"cat": order, "dog": order[::-1]})
    save_config(load_config(None, [f"sweep.ks={ks}", CLASSIFIERS]), run / "config.yaml")
    return run


def test_sweep_job_lands_on_both_workers_including_the_one_without_the_files(cluster, base):
    run = make_sweep_run(base, "sweep-job")
    out = submit(cluster, base, "sweep-job", str(REPO / "jobs" / "sweep.py"), "--run", str(run))
    rows = read_results(run / "sweep" / "results.csv")
    counts = {node: sum(row["node"] == node for row in rows) for node in {row["node"] for row in rows}}
    print(f"sweep cells per node: {counts}")
    assert accuracies(rows) == expected_accuracies(run)
    assert set(counts) == {cluster[1].ip, cluster[2].ip}  # both workers; host 3 sees no run directory
    assert "cells per node:" in out and f":{GCS_PORT}: 3 node(s), 2 CPU(s)" in out


TOPACT_CLASSES, TOPACT_DIM = ["cat", "dog"], 6


def make_topact_run(base: Path) -> tuple[Path, Path]:
    per_class = 9
    root = make_image_folder(base / "work" / "images", {"train": per_class}, size=(36, 44))
    paths = [f"train/{name}/{name}.{i}.jpg" for name in TOPACT_CLASSES for i in range(per_class)]
    rng = np.random.default_rng(3)
    spatial = rng.integers(0, 4, size=(len(paths), TOPACT_DIM, 3, 3)).astype(np.float32)
    train = {"features": spatial.mean(axis=(2, 3)).round(), "labels": np.repeat([0, 1], per_class),
             "paths": np.array(paths, dtype=object), "spatial": spatial}
    run = base / "work" / "topact-job"
    write_store(run / "features", {"train": train}, TOPACT_CLASSES, shard_size=3, spatial_shape=(TOPACT_DIM, 3, 3))
    write_rankings(run / "forest", list(range(TOPACT_DIM)), {"cat": [2, 0, 5], "dog": [4, 2, 1]})
    save_config(load_config(None, ["topact.features_per_class=2", "topact.images_per_feature=4",
                                   "topact.selectivity_top=8"]), run / "config.yaml")
    return run, root


def test_topact_job_spreads_shards_and_montages_and_equals_a_single_host_result(cluster, base):
    run, root = make_topact_run(base)
    submit(cluster, base, "topact-job", str(REPO / "jobs" / "topact.py"), "--run", str(run), "--data", str(root))
    index = json.loads((run / "topact" / "index.json").read_text())
    print(f"topact work per node: {index['nodes']}")
    assert set(index["nodes"]) == {cluster[1].ip, cluster[2].ip}
    assert sum(n["shards"] for n in index["nodes"].values()) == 6
    # host 3 does not see the run directory: any shard it searched came as bytes (Ray may also place every search
    # on host 2, a shard host 3 turned down included); host 2 reads shard files
    reads = {node: {s["read"] for s in index["shards"] if s["node"] == node} for node in index["nodes"]}
    assert reads[cluster[2].ip] <= {"object store"} and "file" in reads[cluster[1].ip]
    assert sum(n["montages"] for n in index["nodes"].values()) == 4
    # the same as one host: every entry's images by brute force, every montage byte for byte as drawn here
    store = FeatureStore(run / "features")
    features = store.features("train")
    config = load_config(run / "config.yaml")
    for name, entries in index["classes"].items():
        for entry in entries:
            expected = np.argsort(-features[:, entry["feature"]], kind="stable")[:4]
            assert [image["row"] for image in entry["images"]] == expected.tolist()
            local = base / "logs" / f"local-{entry['montage']}"
            draw_feature(entry, name, store, config.topact, root, local)
            assert local.read_bytes() == (run / "topact" / entry["montage"]).read_bytes()


CONCEPT_SETTINGS = ["concepts.concepts=3", "concepts.batch_images=5", "concepts.passes=2",
                    "concepts.images_per_concept=4", "concepts.random_directions=3", "gradcam.images_per_class=2"]


def test_concepts_job_runs_its_shard_tasks_on_both_workers_and_equals_a_single_host_result(cluster, base, tiny_run,
                                                                                             synthetic_root):
    from catdog.concepts import run_concepts
    from catdog.extract import extract

    run = Path(shutil.copytree(tiny_run, base / "work" / "concepts-job"))
    extract(load_config(run / "config.yaml", ["extract.shard_size=8", "extract.mixed_precision='no'"]), run,
            synthetic_root)
    out = submit(cluster, base, "concepts-job", str(REPO / "jobs" / "concepts.py"), *CONCEPT_SETTINGS,
                 "--run", str(run), "--data", str(synthetic_root))
    index = json.loads((run / "concepts" / "index.json").read_text())
    print(f"concepts tasks per node: {index['nodes']}")
    assert set(index["nodes"]) == {cluster[1].ip, cluster[2].ip}, out  # both workers; host 3 sees no run directory
    steps = {step: sum(n.get(step, 0) for n in index["nodes"].values()) for step in ("sample", "fit", "measure")}
    assert steps == {"sample": 6, "fit": 2, "measure": 6 + 2}  # 48 train and 10 val images in shards of 8
    # host 3 does not see the run directory: each of its shard tasks got the shard's bytes (Ray may place none of
    # them there, only a fit); host 2 reads files (and may take shards host 3 turned down, with their bytes)
    shard_tasks = {node: sum(n.get(step, 0) for step in ("sample", "gather", "measure"))
                   for node, n in index["nodes"].items()}
    assert index["nodes"][cluster[2].ip].get("shards_sent", 0) == shard_tasks[cluster[2].ip]
    assert index["nodes"][cluster[1].ip].get("shards_sent", 0) < shard_tasks[cluster[1].ip]
    # the same as one process on one host
    local = Path(shutil.copytree(run, base / "concepts-local", ignore=shutil.ignore_patterns("concepts")))
    expected = run_concepts([local], synthetic_root, load_config(run / "config.yaml", CONCEPT_SETTINGS),
                            use_ray=False)[str(local)]
    for name in ("cat", "dog"):
        for a, b in zip(expected["classes"][name]["concepts"], index["classes"][name]["concepts"]):
            assert a["importance"] == pytest.approx(b["importance"], rel=1e-4, abs=1e-6)
            assert [i["row"] for i in a["images"]] == [i["row"] for i in b["images"]]


SLOW_DRIVER = '''
import sys, time
from pathlib import Path
from catdog.cli import run_job
from catdog.config import load_config
from catdog.sweep import fit_cell, format_table, run_sweep

RUN, MARKS, DELAY = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])


def slow_fit(data, feature_idx, estimator):
    """fit_cell after a pause, leaving a mark per call (a folder every host sees)."""
    import ray
    name = f"{type(estimator).__name__}-{len(feature_idx)}"
    Path(MARKS, f"{time.time_ns()}-{ray.util.get_node_ip_address()}-{name}").touch()
    time.sleep(DELAY)
    return fit_cell(data, feature_idx, estimator)


def main():
    rows = run_sweep(RUN, load_config(RUN / "config.yaml"), fit=slow_fit)
    print(format_table(rows))


run_job(main)
'''


def fits(marks: Path) -> list[tuple[str, str]]:
    """(node, cell) of each fit started, in order."""
    return [tuple(p.name.split("-", 2)[1:]) for p in sorted(marks.iterdir(), key=lambda p: int(p.name.split("-")[0]))]


def cell_name(row: dict) -> str:
    return f"{'RandomForestClassifier' if row['classifier'] == 'rf' else 'LogisticRegression'}-{row['n_features']}"


def test_tune_sweep_killed_half_way_resumes_with_restore(cluster, base):
    run = make_sweep_run(base, "tune-kill")
    script, marks = base / "slow_driver.py", base / "marks-tune-kill"
    script.write_text(SLOW_DRIVER)
    marks.mkdir()
    head, results = cluster[0], run / "sweep" / "results.csv"
    argv = [sys.executable, str(script), str(run), str(marks), "1"]
    env = {"RAY_ADDRESS": f"{head.ip}:{GCS_PORT}", "CATDOG_PROGRESS_SECONDS": "1000"}
    driver = head.popen(argv, env=env, log=base / "logs" / "tune-kill-first.log")
    deadline = time.monotonic() + 240
    while len(read_results(results)) < 4:
        assert driver.poll() is None, log_of(base, "tune-kill-first.log")
        assert time.monotonic() < deadline, log_of(base, "tune-kill-first.log")
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = read_results(results)
    first = fits(marks)
    ids_first = {row["trial_id"] for row in before}
    time.sleep(2)  # let the head notice the driver's death and clean up its trial actors

    shutil.rmtree(marks)
    marks.mkdir()
    again = head.run(argv, env=env, timeout=300)
    (base / "logs" / "tune-kill-rerun.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = fits(marks)
    rows = read_results(results)
    print(f"first run: {len(first)} fit(s) started, {len(before)} cell(s) in results.csv when killed")
    print("rerun fitted: " + ", ".join(cell for _, cell in rerun))
    assert "resuming the Tune experiment" in again.stderr
    assert accuracies(rows) == expected_accuracies(run)
    assert {cell_name(row) for row in before}.isdisjoint(cell for _, cell in rerun)  # finished: not fitted again
    assert len(rerun) == len(set(rerun)) <= 10 - len(before)
    assert {row["trial_id"] for row in rows} >= ids_first  # the first run's trials are kept, not rerun


def test_killing_a_worker_host_mid_sweep_loses_nothing(cluster, base):
    """Last in the module: host 2's Ray is killed (SIGKILL to every process in that namespace: raylet, object
    store, workers, dashboard agent) while one of its workers fits a cell."""
    run = make_sweep_run(base, "worker-kill", ks="[1, 4, all]")
    script, marks = base / "slow_driver.py", base / "marks-worker-kill"
    script.write_text(SLOW_DRIVER)
    marks.mkdir()
    head, victim = cluster[0], cluster[1]
    driver = head.popen([sys.executable, str(script), str(run), str(marks), "1"],
                        env={"RAY_ADDRESS": f"{head.ip}:{GCS_PORT}", "CATDOG_PROGRESS_SECONDS": "1000"},
                        log=base / "logs" / "worker-kill.log")
    deadline = time.monotonic() + 240
    while not any(node == victim.ip for node, _ in fits(marks)):
        assert driver.poll() is None and time.monotonic() < deadline, log_of(base, "worker-kill.log")
        time.sleep(0.2)
    killed = victim.pids()
    victim.kill_all(hard=True)
    print(f"killed {len(killed)} process(es) of host 2 ({victim.ip}) during fit "
          f"{[cell for node, cell in fits(marks) if node == victim.ip]}")
    driver.wait(timeout=300)
    output = log_of(base, "worker-kill.log")
    assert driver.returncode == 0, output
    rows = read_results(run / "sweep" / "results.csv")
    assert accuracies(rows) == expected_accuracies(run)  # every cell, equal to the serial fits
    assert len(rows) == 6
    started_on_victim = [cell for node, cell in fits(marks) if node == victim.ip]
    print(f"cells per node in results.csv: {dict((n, sum(r['node'] == n for r in rows)) for n in {r['node'] for r in rows})}")
    assert started_on_victim and cluster[2].ip in {row["node"] for row in rows}
