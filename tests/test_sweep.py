import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import ray
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

from catdog.config import ClassifierSpec, SweepConfig, load_config, save_config
from catdog.errors import CatdogError
from catdog.store import FeatureStore
from catdog.sweep import (SweepFailed, build_estimator, cpu_share, fit_cell, format_table, load_split_data,
                          read_results, run_sweep, sample_rows, sweep_cells, trial_cpus, write_results)
from conftest import REPO
from synthetic_store import write_rankings, write_store

DIM, INFORMATIVE = 16, 3
RANKING = [INFORMATIVE] + [f for f in range(DIM) if f != INFORMATIVE]
"""The fixture's global ranking: the informative feature first."""
CLASSIFIERS = ("sweep.classifiers={rf: {estimator: RandomForestClassifier, params: {n_estimators: 8, random_state: 0}},"
               " lr: {estimator: LogisticRegression, params: {max_iter: 200}}}")


def split_arrays(n: int, seed: int) -> dict:
    """Noise features, except feature 3, which is the label plus a little noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, DIM)).astype(np.float32)
    features[:, INFORMATIVE] = 2 * labels + 0.3 * rng.normal(size=n)
    return {"features": features, "labels": labels, "paths": np.array([f"x/{i}.jpg" for i in range(n)], dtype=object)}


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> Path:
    """A run directory with a 3-shard train split, test and val, a forest ranking and a small sweep config."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    splits = {"train": split_arrays(60, 0), "test": split_arrays(30, 1), "val": split_arrays(30, 2)}
    write_store(run / "features", splits, ["cat", "dog"], shard_size=25)
    write_rankings(run / "forest", RANKING, {"cat": RANKING, "dog": RANKING[::-1]})
    save_config(load_config(None, ["sweep.ks=[1, 4, all]", CLASSIFIERS]), run / "config.yaml")
    return run


def copy_run(sweep_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sweep_run, tmp_path / "run"))


def data_of(run: Path) -> dict:
    store = FeatureStore(run / "features")
    return {split: (store.features(split), store.labels(split)) for split in ("train", "test", "val")}


def expected_accuracies(run: Path) -> dict:
    """Each cell fitted serially, in this process: (k, classifier) -> (test, val)."""
    config = load_config(run / "config.yaml")
    data, order = data_of(run), np.array(RANKING)
    out = {}
    for cell in sweep_cells(config.sweep, DIM):
        result = fit_cell(data, order[:cell.n_features], build_estimator(cell.spec))
        out[(str(cell.k), cell.classifier)] = (result["test_accuracy"], result["val_accuracy"])
    return out


def accuracies(rows: list[dict]) -> dict:
    return {(row["k"], row["classifier"]): (float(row["test_accuracy"]), float(row["val_accuracy"])) for row in rows}


def test_fit_cell_uses_only_the_chosen_features(sweep_run):
    data = data_of(sweep_run)
    informative = fit_cell(data, np.array([INFORMATIVE]), LogisticRegression())
    noise = fit_cell(data, np.array([0, 1]), LogisticRegression())
    assert informative["test_accuracy"] == informative["val_accuracy"] == 1.0
    assert noise["test_accuracy"] < 0.8
    assert informative["fit_seconds"] > 0

    columns = np.array([5, INFORMATIVE, 9])
    forest = RandomForestClassifier(n_estimators=8, random_state=0)
    direct = forest.fit(data["train"][0][:, columns], data["train"][1])
    x_val, y_val = data["val"]
    assert fit_cell(data, columns, forest)["val_accuracy"] == accuracy_score(y_val, direct.predict(x_val[:, columns]))


def test_estimators_are_resolved_by_name_with_clear_errors():
    assert isinstance(build_estimator(ClassifierSpec(estimator="SVC", params={"C": 2.0})).C, float)
    with pytest.raises(CatdogError, match="'RandomForrestClassifier' is not a scikit-learn classifier"):
        build_estimator(ClassifierSpec(estimator="RandomForrestClassifier"))
    with pytest.raises(CatdogError, match="bad params for LogisticRegression"):
        build_estimator(ClassifierSpec(estimator="LogisticRegression", params={"trees": 3}))


def test_the_trials_data_is_the_top_columns_of_the_sample(sweep_run):
    """One Fortran-ordered float32 array per split, the ranking's first K columns in order; a cell's first k
    columns of it fit exactly as the same columns picked from the whole store."""
    store, full = FeatureStore(sweep_run / "features"), data_of(sweep_run)
    order = np.array(RANKING)
    config = load_config(sweep_run / "config.yaml", ["sweep.max_train_rows=20", "sweep.max_eval_rows=10"])
    sample = sample_rows(store, config.sweep)
    assert {split: len(rows) for split, rows in sample.items()} == {"train": 20, "test": 10, "val": 10}
    assert all(np.bincount(full[split][1][rows]).tolist() == [len(rows) // 2] * 2 for split, rows in sample.items())
    data = load_split_data(store, sample, order[:4])
    for split, (x, y) in data.items():
        assert x.dtype == np.float32 and x.flags.f_contiguous and x.shape == (len(sample[split]), 4)
        np.testing.assert_array_equal(x, full[split][0][sample[split]][:, order[:4]])
        np.testing.assert_array_equal(y, full[split][1][sample[split]])
    assert np.shares_memory(data["train"][0][:, :2], data["train"][0])
    whole = load_split_data(store, sample_rows(store, load_config(sweep_run / "config.yaml").sweep), order[:4])
    forest = RandomForestClassifier(n_estimators=8, random_state=0)
    picked = fit_cell(full, order[:2], forest)
    sliced = fit_cell(whole, range(2), forest)
    assert (sliced["test_accuracy"], sliced["val_accuracy"]) == (picked["test_accuracy"], picked["val_accuracy"])


def test_each_trial_asks_for_the_cpus_it_uses():
    assert cpu_share(cells=6, total_cpus=2, node_cpus=2) == 1
    assert cpu_share(cells=3, total_cpus=16, node_cpus=16) == 6  # rounded up: no CPU idle at the start
    assert cpu_share(cells=2, total_cpus=64, node_cpus=16) == 16  # a trial runs on one node
    rf = ClassifierSpec(estimator="RandomForestClassifier")
    assert trial_cpus(rf, share=3, node_cpus=16) == 3
    assert trial_cpus(rf.model_copy(update={"params": {"n_jobs": 4}}), share=3, node_cpus=16) == 4
    assert trial_cpus(rf.model_copy(update={"params": {"n_jobs": 64}}), share=3, node_cpus=16) == 16
    assert trial_cpus(rf.model_copy(update={"params": {"n_jobs": -1}}), share=3, node_cpus=16) == 16


def test_grid_caps_k_at_the_feature_count():
    cfg = SweepConfig(ks=[2, 50, "all"], classifiers={"lr": ClassifierSpec(estimator="LogisticRegression")})
    assert [(c.k, c.n_features) for c in sweep_cells(cfg, DIM)] == [(2, 2), (50, DIM), ("all", DIM)]


def test_sweep_writes_every_cell_and_a_rerun_computes_only_missing_ones(ray_local, sweep_run, tmp_path):
    run = copy_run(sweep_run, tmp_path)
    config = load_config(run / "config.yaml")
    rows = run_sweep(run, config)
    assert accuracies(rows) == expected_accuracies(run)
    assert [row["n_features"] for row in rows] == ["1", "4", str(DIM)] * 2
    assert (run / "sweep" / "accuracy_vs_k.png").stat().st_size > 10_000
    assert load_config(run / "sweep" / "config.yaml") == config

    assert {row["node"] for row in rows} == {ray.util.get_node_ip_address()}
    assert len({row["trial_id"] for row in rows}) == 6
    assert (run / "sweep" / "tune" / "grid").is_dir()  # Tune's experiment

    results = run / "sweep" / "results.csv"
    calls = tmp_path / "calls"
    calls.mkdir()

    def counting_fit(data, feature_idx, estimator):
        (calls / f"{type(estimator).__name__}-{len(feature_idx)}").touch()
        return fit_cell(data, feature_idx, estimator)

    # rows lost from results.csv, but the finished experiment has them: recovered with no fit at all
    write_results(results, [row for row in rows if (row["k"], row["classifier"]) not in {("4", "rf"), ("all", "lr")}])
    assert accuracies(run_sweep(run, config, fit=counting_fit)) == accuracies(rows)
    assert list(calls.iterdir()) == []

    # without the experiment, exactly the cells missing from results.csv are computed
    shutil.rmtree(run / "sweep" / "tune")
    write_results(results, [row for row in rows if (row["k"], row["classifier"]) not in {("4", "rf"), ("all", "lr")}])
    again = run_sweep(run, config, fit=counting_fit)
    assert sorted(p.name for p in calls.iterdir()) == ["LogisticRegression-16", "RandomForestClassifier-4"]
    assert accuracies(again) == accuracies(rows)
    assert accuracies(read_results(results)) == accuracies(rows)


def test_hyperparameter_axes_become_grid_cells_and_columns(ray_local, sweep_run, tmp_path):
    run = copy_run(sweep_run, tmp_path)
    config = load_config(run / "config.yaml", [
        "sweep.ks=[1, all]",
        "sweep.classifiers={lr: {estimator: LogisticRegression, params: {max_iter: 200, C: {grid_search: [0.01, 1.0]}}},"
        " rf: {estimator: RandomForestClassifier, params: {n_estimators: 8, random_state: 0,"
        " max_features: {grid_search: [1, sqrt]}}}}"])
    cells = sweep_cells(config.sweep, DIM)
    assert [(c.classifier, c.hyper, c.k) for c in cells] == [  # the run's config lists rf first
        ("rf", {"max_features": 1}, 1), ("rf", {"max_features": 1}, "all"),
        ("rf", {"max_features": "sqrt"}, 1), ("rf", {"max_features": "sqrt"}, "all"),
        ("lr", {"C": 0.01}, 1), ("lr", {"C": 0.01}, "all"), ("lr", {"C": 1.0}, 1), ("lr", {"C": 1.0}, "all")]
    rows = run_sweep(run, config)
    assert len(rows) == 8
    assert [(row["param_C"], row["param_max_features"]) for row in rows] == [
        ("", "1"), ("", "1"), ("", "sqrt"), ("", "sqrt"), ("0.01", ""), ("0.01", ""), ("1.0", ""), ("1.0", "")]
    data = data_of(run)
    order = np.array(RANKING)
    for cell, row in zip(cells, rows):
        serial = fit_cell(data, order[:cell.n_features], build_estimator(cell.spec))
        assert (float(row["test_accuracy"]), float(row["val_accuracy"])) == (serial["test_accuracy"],
                                                                             serial["val_accuracy"])
    assert "lr C=0.01" in format_table(rows)


def test_a_sampled_sweep_fits_its_sample_and_equals_the_unsampled_one_when_every_row_fits(ray_local, sweep_run,
                                                                                          tmp_path):
    run = copy_run(sweep_run, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()

    def recording_fit(data, columns, estimator):
        from joblib import effective_n_jobs

        (marks / f"{time.time_ns()}-{effective_n_jobs()}").touch()
        return fit_cell(data, columns, estimator)

    def rf_only(*overrides: str):
        """One cell: the forest on every feature."""
        config = load_config(run / "config.yaml", ["sweep.ks=[all]", *overrides])
        config.sweep.classifiers = {"rf": config.sweep.classifiers["rf"]}
        return config

    sampled = rf_only("sweep.max_train_rows=20", "sweep.max_eval_rows=10")
    [row] = run_sweep(run, sampled, fit=recording_fit)
    assert row["sample"] == "train 20/60 test 10/30 val 10/30 seed 0"
    store, full, order = FeatureStore(run / "features"), data_of(run), np.array(RANKING)
    sample = sample_rows(store, sampled.sweep)
    serial = fit_cell({split: (x[sample[split]], y[sample[split]]) for split, (x, y) in full.items()}, order,
                      build_estimator(sampled.sweep.classifiers["rf"]))
    assert (float(row["test_accuracy"]), float(row["val_accuracy"])) == (serial["test_accuracy"],
                                                                         serial["val_accuracy"])
    assert [p.name.rsplit("-", 1)[1] for p in marks.iterdir()] == ["2"]  # the one cell got both CPUs

    every_row = rf_only("sweep.max_train_rows=60", "sweep.max_eval_rows=30")
    [row] = run_sweep(run, every_row, fit=recording_fit)  # another sample: fitted again
    assert row["sample"] == "" and len(list(marks.iterdir())) == 2
    unsampled = fit_cell(full, order, build_estimator(every_row.sweep.classifiers["rf"]))
    assert (float(row["test_accuracy"]), float(row["val_accuracy"])) == (unsampled["test_accuracy"],
                                                                         unsampled["val_accuracy"])


def test_sweep_survives_a_killed_worker(ray_local, sweep_run, tmp_path):
    """The first task to start kills its own worker; Ray reruns it. Without retries the sweep fails,
    keeps the cells that finished, and a rerun completes it."""
    run = copy_run(sweep_run, tmp_path)
    marker = tmp_path / "killed"

    def die_once(data, feature_idx, estimator):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return fit_cell(data, feature_idx, estimator)
        os._exit(1)

    rows = run_sweep(run, load_config(run / "config.yaml"), fit=die_once)
    assert marker.exists()
    assert accuracies(rows) == expected_accuracies(run)

    shutil.rmtree(run / "sweep")
    marker.unlink()
    no_retries = load_config(run / "config.yaml", ["sweep.max_retries=0"])
    with pytest.raises(SweepFailed, match="1 cell\\(s\\) failed after 0 retries"):
        run_sweep(run, no_retries, fit=die_once)
    assert len(read_results(run / "sweep" / "results.csv")) == 5
    assert accuracies(run_sweep(run, no_retries)) == expected_accuracies(run)  # the errored trial is rerun


def test_a_bad_parameter_fails_as_one_line_naming_the_cell(ray_local, sweep_run, tmp_path):
    run = copy_run(sweep_run, tmp_path)
    config = load_config(run / "config.yaml", [
        "sweep.ks=[1]", "sweep.classifiers={lr: {estimator: LogisticRegression, params: {C: -1.0}}}"])
    with pytest.raises(CatdogError, match="sweep cell k=1 lr .*C"):
        run_sweep(run, config)


def test_missing_forest_is_a_clear_error(sweep_run, tmp_path):
    run = copy_run(sweep_run, tmp_path)
    shutil.rmtree(run / "forest")
    with pytest.raises(CatdogError, match="run jobs/forest.py"):
        run_sweep(run, load_config(run / "config.yaml"))


def test_cluster_config_is_a_valid_ray_cluster_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "configs" / "ray-cluster.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "local"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_sweep_runs_as_a_job_on_a_started_head(sweep_run, tmp_path):
    """``ray start --head`` on 127.0.0.1 (token authentication on), ``ray job submit`` of jobs/sweep.py."""
    run = copy_run(sweep_run, tmp_path)
    ray_cli = str(Path(sys.executable).parent / "ray")
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    address = f"http://127.0.0.1:{dashboard}"
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--temp-dir={temp_dir}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray_cli, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the head's dashboard did not come up"
            time.sleep(2)
        job = subprocess.run([ray_cli, "job", "submit", "--address", address, "--",
                              sys.executable, str(REPO / "jobs" / "sweep.py"), "--run", str(run)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "succeeded" in job.stdout
        assert f":{gcs}: 1 node(s), 2 CPU(s)" in job.stdout, job.stdout  # the job's driver joined this head
        assert accuracies(read_results(run / "sweep" / "results.csv")) == expected_accuracies(run)
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def sweep_job(run: Path, env: dict, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), "--run", str(run), *args],
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env}, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - start


@pytest.mark.parametrize("how", ["RAY_ADDRESS=127.0.0.1:1", "--address 127.0.0.1:1", "RAY_ADDRESS=http://127.0.0.1:1"])
def test_an_unreachable_address_is_one_line_within_seconds(sweep_run, tmp_path, how):
    run = copy_run(sweep_run, tmp_path)
    env = {"RAY_ADDRESS": how.split("=", 1)[1]} if how.startswith("RAY_ADDRESS") else {}
    args = how.split() if how.startswith("--") else []
    done, _ = sweep_job(run, env, *args)
    assert done.returncode == 2, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "127.0.0.1:1" in error[0] and "Traceback" not in done.stderr, done.stderr
    assert not (run / "sweep").exists()  # nothing written


def test_address_checks(ray_local):
    from catdog.cluster import gcs_problem, resolve_address

    live = ray.get_runtime_context().gcs_address
    assert gcs_problem(live) is None
    assert resolve_address(live) == live
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    http = socket.create_server(("127.0.0.1", 0))  # answers like an HTTP/1.1 server (the dashboard's port)

    def answer() -> None:
        conn, _ = http.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        assert gcs_problem(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1) == "no answer within 1 s"
        with pytest.raises(CatdogError, match="something answers there, but not Ray's GCS"):
            resolve_address(f"127.0.0.1:{http.getsockname()[1]}")
    finally:
        silent.close()
        http.close()


@pytest.mark.slow
def test_a_dead_recorded_cluster_is_skipped_unless_named(sweep_run, tmp_path):
    """``ray start`` recorded a cluster (``RAY_TMPDIR/ray/ray_current_cluster``) that has since died: without an
    address the job warns in one line and runs on a fresh local Ray; with that address it is the one-line error."""
    run = copy_run(sweep_run, tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: a local Ray's sockets live under it
    try:
        (ray_tmp / "ray").mkdir()
        dead = f"127.0.0.1:{free_ports(1)[0]}"
        (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
        env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}

        named, _ = sweep_job(run, {**env, "RAY_ADDRESS": dead})
        assert named.returncode == 2, named.stderr
        assert [line for line in named.stderr.splitlines() if line.startswith("error:")] == [
            f"error: RAY_ADDRESS={dead}: cannot reach a Ray cluster there (Connection refused); start the cluster "
            "(ray start --head) or fix the address, or unset RAY_ADDRESS to run on a local Ray"]

        done, _ = sweep_job(run, env)
        assert done.returncode == 0, done.stderr
        warnings = [line for line in done.stderr.splitlines() if "dead Ray cluster" in line]
        assert len(warnings) == 1 and dead in warnings[0] and "starting a local Ray" in warnings[0]
        # the driver's own output: Ray prefixes what its workers print, e.g. a worker torn down at shutdown
        driver = [line for line in done.stderr.splitlines() if " pid=" not in line]
        assert not [line for line in driver if "Traceback" in line], done.stderr
        assert accuracies(read_results(run / "sweep" / "results.csv")) == expected_accuracies(run)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("name, processes, machines", [("one_gpu", 1, 1), ("eight_gpus_bf16", 8, 1),
                                                       ("two_nodes", 16, 2)])
def test_accelerate_example_configs_load(name, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines) == (processes, machines)


def test_the_address_check_gives_up_within_its_timeout():
    """What bounds the job's time to its error: the check itself (the rest is Python's imports)."""
    from catdog.cluster import CONNECT_TIMEOUT_S, gcs_problem

    start = time.monotonic()
    assert gcs_problem("127.0.0.1:1") is not None
    assert time.monotonic() - start <= CONNECT_TIMEOUT_S + 1
