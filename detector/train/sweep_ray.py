"""`detector sweep --backend ray`: the sweep's runs as Ray Core tasks, one per (batch, seed), on a cluster.

Each task runs the ordinary `detector train` as a subprocess in an attempt
folder (detector.train.attempts); Ray places it where `--gpus-per-run` and
`--cpus-per-run` fit and sets CUDA_VISIBLE_DEVICES for it. The driver plans the
runs as the local backend does, checks that every node sees the sweep folder,
submits what is not finished, shows progress and writes the same report.

Ray is imported only here and only when this backend is chosen.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from detector import fileio
from detector.config import TrainConfig
from detector.errors import DetectorError, RunDirError, TrainingInterrupted, UsageError
from detector.record.writer import Recorder, now_iso
from detector.record import mlflow_log
from detector.report import render
from detector.train import attempts, sweep
from detector.train.sweep import PlannedRun, SweepConfig

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"  # the version the tests ran against; pyproject's `ray` extra pins it
INSTALL_HINT = f"--backend ray needs Ray: pip install 'detector[ray]' (Ray {RAY_VERSION})"
PROGRESS_S = 2.0  # how often the driver looks at the runs
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

# Ray's own network habits, switched off before it is imported (README, "Sweeps on a Ray cluster").
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report ...
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",  # ... and its 'disabled' ping goes to loopback
    "RAY_AUTH_MODE": "disabled",  # no token written to ~/.ray (a cluster that needs one sets this itself)
    "RAY_DEDUP_LOGS": "0",
}


@dataclass(frozen=True)
class RayOptions:
    """--address, --gpus-per-run, --cpus-per-run; None: decided from the cluster's resources."""

    address: str | None = None  # None: start Ray on this machine for the sweep; 'auto' or host:port: a cluster
    gpus_per_run: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_run: float | None = None  # None: 1 with GPUs; without, every CPU of the smallest node
    max_retries: int = 3  # re-runs of a task whose node or worker was lost

    def check(self) -> "RayOptions":
        for flag, value in (("--gpus-per-run", self.gpus_per_run), ("--cpus-per-run", self.cpus_per_run)):
            if value is not None and value < 0:
                raise UsageError(f"{flag} must be 0 or more, not {value:g}")
        if self.gpus_per_run is not None and self.gpus_per_run > 1 and self.gpus_per_run % 1:
            raise UsageError(f"--gpus-per-run above 1 must be a whole number of GPUs, not {self.gpus_per_run:g}")
        return self


def import_ray(options: RayOptions):
    """Ray, with its telemetry and token off; UsageError with the install line when it is missing."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if options.address is None or options.address.rsplit(":", 1)[0] in LOOPBACK:
        # One machine: keep every Ray address on loopback (Ray otherwise swaps 127.0.0.1 for the host's own
        # IP). Read when Ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def _connect(ray, options: RayOptions) -> None:
    """Start Ray on this machine (no address) or join the cluster at options.address."""
    kwargs = {"log_to_driver": False, "logging_level": "ERROR"}
    try:
        if options.address is None:
            ray.init(include_dashboard=False, **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = options.address or "this machine"
        raise DetectorError(f"cannot start or reach Ray at {where}: {first}; start the head with 'ray start --head' "
                            "or leave out --address") from None


def _check_reachable(address: str) -> None:
    """Refuse an address nothing listens on (ray.init would retry it for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise DetectorError(f"no Ray cluster answers at {address} ({reason}); start its head with "
                            "'ray start --head', or leave out --address to run Ray on this machine") from None


def resources(ray, options: RayOptions) -> dict:
    """num_gpus and num_cpus of each run's task, defaults filled in from the alive nodes."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    has_gpus = any(r.get("GPU", 0) > 0 for r in nodes)
    gpus = options.gpus_per_run if options.gpus_per_run is not None else (1.0 if has_gpus else 0.0)
    cpus = options.cpus_per_run
    if cpus is None:
        cpus = 1.0 if gpus else min((r["CPU"] for r in nodes if r.get("CPU", 0) > 0), default=1.0)
    biggest = max(((r.get("GPU", 0), r.get("CPU", 0)) for r in nodes), default=(0, 0))
    if not any(r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus for r in nodes):
        raise UsageError(f"no node of the Ray cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s) for one run (the "
                         f"largest has {biggest[0]:g} and {biggest[1]:g}); lower --gpus-per-run or --cpus-per-run")
    return {"num_gpus": gpus, "num_cpus": cpus}


def check_storage(ray, folder: Path, data: Path | None) -> int:
    """Every alive node must see the sweep folder (a marker each way) and the dataset; return the node count."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe, token = folder / attempts.STORAGE_PROBE, uuid.uuid4().hex
    probe.mkdir(exist_ok=True)
    fileio.write_text(probe / "driver", token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(attempts.probe_storage)
    try:
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token, n["NodeID"], str(data) if data else None) for n in nodes]
        answers = ray.get(refs, timeout=300)
        for node, problem in zip(nodes, answers):
            marker = probe / node["NodeID"]
            if problem is None and (not marker.is_file() or marker.read_text(encoding="utf-8") != token):
                problem = f"the driver does not see what it wrote in {folder}"
            if problem:
                raise RunDirError(f"node {node.get('NodeManagerAddress', '?')} cannot take runs: {problem}; put "
                                  "--project (and --data) on a folder every node mounts at the same path")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return len(nodes)


def run_on_node(spec: attempts.RunSpec) -> dict:
    """The Ray task: one run, told which node it landed on."""
    import ray

    return attempts.execute(spec, ray.get_runtime_context().get_node_id())


def _absolute(value):
    """A path the user gave, made absolute (workers start elsewhere); a name such as a preset stays as it is."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def spec_for(config: SweepConfig, folder: Path, p: PlannedRun, gpus: float = 0) -> attempts.RunSpec:
    """The `detector train` options that make run p, as the local backend's TrainConfig would have them."""
    t: TrainConfig = config.template
    # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: without --device it would take GPU 0.
    device = t.device if t.device is not None or gpus else "cpu"
    run = replace(t, data=_absolute(t.data), model=_absolute(t.model), augment=_absolute(t.augment), device=device,
                  batch=replace(t.batch, requested=p.batch), seed=p.seed, overrides={**t.overrides, **p.overrides})
    args = run.to_argv(only=sweep.RUN_OPTIONS)
    return attempts.RunSpec(folder=str(folder), name=p.name, args=tuple(args), device=device, sweep=p.record)


def run(config: SweepConfig, options: RayOptions) -> Path:
    """Train every unfinished run of the sweep on Ray, then write the comparison; return report.html."""
    options.check()
    ray = import_ray(options)
    if options.address not in (None, "auto"):
        _check_reachable(options.address)
    planned = sweep.plan(config)
    sweep.check_inputs(config, planned)
    folder, lock = sweep.open_sweep(config)
    try:
        return _train_and_compare(ray, options, config, planned, folder)
    finally:
        lock.release()


def _train_and_compare(ray, options: RayOptions, config: SweepConfig, planned: list, folder: Path) -> Path:
    todo = [p for p in planned if not attempts.is_completed(folder / p.name)]
    for p in planned:
        if p not in todo:
            log.info(f"{p.name}: already completed, skipped")
    failures = []
    if todo:
        started = time.time()
        _connect(ray, options)
        try:
            failures = _train_all(ray, options, config, folder, todo)
        finally:
            ray.shutdown()
        log.info(f"sweep trained for {(time.time() - started) / 60:.1f} min; writing the comparison")
    existing = [folder / p.name for p in planned if (folder / p.name / "run.json").is_file()]
    if not existing:
        raise DetectorError(f"no run of the sweep finished ({'; '.join(failures)})")
    html = render.compare(existing, folder)
    if config.template.mlflow:  # the report as an MLflow run, the sweep's runs nested under it
        mlflow_log.log_sweep(config.template.mlflow, folder, existing)
    if failures:
        raise DetectorError(f"{len(failures)} run(s) of the sweep failed ({'; '.join(failures)}); the report "
                            f"{html} shows what finished; run the same command again to retry them")
    return html


def _train_all(ray, options: RayOptions, config: SweepConfig, folder: Path, todo: list) -> list[str]:
    """Check the storage, submit one task per run, follow them; return one line per failed run."""
    need = resources(ray, options)
    data = Path(_absolute(config.template.data)) if config.template.data is not None else None
    nodes = check_storage(ray, folder, data)
    log.info(f"Ray: {nodes} node(s) see {folder}; {len(todo)} run(s) to train, each with {need['num_gpus']:g} GPU(s) "
             f"and {need['num_cpus']:g} CPU(s)")
    task = ray.remote(run_on_node).options(**need, max_retries=options.max_retries, retry_exceptions=False)
    since = time.time()
    refs = {task.remote(spec_for(config, folder, p, need["num_gpus"])): p.name for p in todo}
    try:
        return _follow(ray, refs, folder, since)
    except KeyboardInterrupt:
        stopped = _cancel(ray, refs, folder, since)
        raise TrainingInterrupted(f"sweep interrupted; {len(stopped)} run(s) stopped and marked interrupted "
                                  f"({', '.join(stopped) or 'none had started'}); run the same command again to "
                                  "continue (completed runs are skipped, unfinished ones resumed)") from None


def _follow(ray, refs: dict, folder: Path, since: float) -> list[str]:
    """Wait for every task, printing a progress line whenever it changes; return the failures."""
    pending, done, failures, shown = list(refs), [], [], ""
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=PROGRESS_S)
        for ref in ready:
            result = _result(ray, ref, refs[ref])
            done.append(result["name"])
            if result["status"] in ("completed", "skipped"):
                log.info(f"{result['name']}: {result['status']}")
            else:
                failures.append(f"{result['name']} {result['status']}: {result.get('error', '')}")
                log.info(f"{result['name']} {result['status']}: {result.get('error', '')}")
        line = progress_line([refs[r] for r in pending], len(done) - len(failures), len(failures), folder, since)
        if line != shown:
            log.info(line)
            shown = line
    return failures


def _result(ray, ref, name: str) -> dict:
    """A task's result; Ray's own failures (retries used up, a crash in the task) as a failed run."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"name": name, "status": "failed", "error": f"Ray: {type(e).__name__}: {first[:300]}"}


def progress_line(pending: list[str], done: int, failed: int, folder: Path, since: float) -> str:
    """'2 done, 1 running (b16-s0 epoch 2/5), 1 queued, 0 failed': each running run's epoch from its record."""
    running = []
    for name in pending:
        state = attempts.live(folder, name, since)
        if state is not None:
            finished, total = state
            running.append(f"{name} epoch {min(finished + 1, total) if total else '?'}/{total or '?'}")
    queued = len(pending) - len(running)
    return (f"{done} done, {len(running)} running" + (f" ({', '.join(running)})" if running else "") +
            f", {queued} queued, {failed} failed")


def _cancel(ray, refs: dict, folder: Path, since: float) -> list[str]:
    """Cancel every task; mark runs whose training did not get to say so itself as interrupted."""
    for ref in refs:
        ray.cancel(ref)  # a running task gets KeyboardInterrupt and passes SIGINT to its training
    ray.wait(list(refs), num_returns=len(refs), timeout=60)
    stopped = []
    for name in refs.values():
        for info in (folder / attempts.ATTEMPTS / name).glob(f"*/{attempts.ATTEMPT_JSON}"):
            run_dir = info.parent / name
            if info.stat().st_mtime < since or not (run_dir / "run.json").is_file():
                continue
            stopped.append(name)
            if Recorder(run_dir).read().get("status") == "running":
                Recorder(run_dir).update(status="interrupted", finished=now_iso())
    return sorted(set(stopped))
