"""Starting or joining Ray, and sizing actor pools from the cluster's real resources.

Two traps shape this module (STACK.md): a GPU request on a GPU-less cluster hangs forever, and an
actor pool that takes every CPU starves Ray Data's read tasks and deadlocks. So GPU use is decided
from `ray.cluster_resources()`, an explicit GPU request without GPUs fails fast, and CPU actors
always leave at least one CPU for reads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pipeline.config import RayConfig
from pipeline.errors import ResourceError

log = logging.getLogger("influcoder.ray")

# Environment every worker needs: nothing may reach a model hub at run time.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # transformers draws a "Loading weights" bar per model load in every actor; through Ray's log
    # forwarding each one lands on the user's console.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


# Where the object store is (not who may use it): forwarded from the driver to every Ray worker.
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")

_started_here = False  # whether ensure_ray started (or joined) Ray in this process


def ensure_ray(cfg: RayConfig) -> None:
    """Start an in-process Ray (one machine) or join the cluster at `cfg.address`. Idempotent."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    _started_here = True
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    env = {"env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}}
    if os.environ.get("INFLUCODER_CACHE"):
        env["env_vars"]["INFLUCODER_CACHE"] = os.environ["INFLUCODER_CACHE"]
    # Workers must reach the run_dir's object store where the driver does. Only where it is goes
    # along: credentials stay in each node's own environment (a runtime_env is shown by the dashboard).
    env["env_vars"].update({k: os.environ[k] for k in OBJECT_STORE_ENV if os.environ.get(k)})
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Worker output (Ray Train's per-report lines, library warnings from every actor) reaches the
    # console only with -v; errors still arrive as the exceptions they raise. The files stay in
    # Ray's session log directory either way.
    verbose = logging.getLogger("influcoder").isEnabledFor(logging.DEBUG)
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=verbose)
    else:
        dashboard_port = None
        if cfg.include_dashboard:
            # Ray Train's placement-group cleaner (a worker) finds the State API by auto-detecting "the"
            # local cluster, which fails as soon as a second Ray runs on the machine ("Found multiple
            # active Ray instances"). Naming our dashboard's address in the workers' environment removes
            # the guess; the port is chosen here because it must be known before the workers start.
            dashboard_port = _free_local_port()
            env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        # address="local": always a new in-process Ray. Without it, ray.init() joins any cluster that
        # `ray start` runs on this machine (and then rejects num_cpus).
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",
            **({"dashboard_port": dashboard_port} if dashboard_port else {}),
            runtime_env=env,
            log_to_driver=verbose,
        )
    quiet_ray_data(verbose)
    log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})


def _free_local_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress output off: each stage reports rows done itself (pipeline.progress).

    Without a terminal Ray Data logs a multi-line block per dataset every 10 s, which reads `0/?`
    while a stateful actor pool loads its model, and announces every execution plan at INFO.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # ... and its warning that the bars it draws are off, which is what we asked for.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # Its high-memory detector prints a 14-line block every 30 s while a teacher actor holds its
        # ~3 GiB: the pools are sized by `plan_actors` (one actor per free CPU share, a model each), not
        # by Ray's memory requests, so the advice to request memory is not an action for the user.
        detectors = getattr(ctx, "issue_detectors_config", None)
        if detectors is not None and hasattr(detectors, "high_memory_detector_config"):
            detectors.high_memory_detector_config.detection_time_interval_s = -1
    # `ActorPlan.map_batches_kwargs` bounds actor restarts (`max_restarts`, `max_task_retries`);
    # Ray 2.60 has no named parameter for them yet, so they travel as the `ray_remote_args` it warns
    # about. Ray Data's own default is unbounded restarts, which would loop on a poisoned batch.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")


def stream_outputs(ds) -> Iterator:
    """A mapped dataset's output blocks (pyarrow), each handed over as soon as its task returns.

    Ray Data's `iter_batches` prefetches one block by default: it holds a finished block until the
    next one is ready too. With the stages' actors a block is a shard of minutes of teacher work,
    so each shard file was written (and progress counted) one shard late, and a crash lost a
    finished shard besides the ones in flight. `prefetch_batches=0` hands a block over when it is
    ready (Ray Data itself still holds one back now and then: tests/test_stream_outputs.py).
    """
    return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)


ACTOR_MAX_RESTARTS = 4


@dataclass(frozen=True)
class ActorPlan:
    """How many stateful actors a Ray Data stage runs, and what each one asks for."""

    num_actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    def map_batches_kwargs(self) -> dict:
        import ray.data

        return {
            "compute": ray.data.ActorPoolStrategy(size=self.num_actors),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            # A killed actor is replaced and its batch retried, but an actor that dies on every batch
            # (out of memory, a poisoned input) must fail the stage instead of looping forever.
            "max_restarts": ACTOR_MAX_RESTARTS,
            "max_task_retries": ACTOR_MAX_RESTARTS,
        }


def cluster_cpus_gpus() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def largest_node_cpus() -> float:
    """CPUs of the biggest alive node: one actor can never ask for more (it would never schedule)."""
    import ray

    return max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def plan_actors(use_gpu: bool | None, num_actors: int | None, key: str, *, training: bool = False) -> ActorPlan:
    """Size an actor pool (Ray Data's stateful actors) or, with `training`, a Ray Train worker group.

    `key` names the config section (e.g. `sketch`) for error messages. A GPU or CPU request the
    cluster cannot meet would stay pending forever, so it fails fast with `ResourceError`.
    Actor pools leave one CPU to Ray Data's read tasks; a training group reads nothing, and on CPUs
    runs one worker by default (DDP between processes of one small machine only adds overhead).
    """
    count_key = f"{key}.num_workers" if training else f"{key}.num_actors"
    what = "workers" if training else "actors"
    cpus, gpus = cluster_cpus_gpus()
    if use_gpu and gpus < 1:
        raise ResourceError(
            f"`{key}.use_gpu` is true but the Ray cluster has no GPU (resources: CPU={cpus:g}, GPU=0). "
            f"Set `--set {key}.use_gpu=false` to run on CPUs, or add GPU nodes to the cluster."
        )
    if use_gpu is None:
        use_gpu = gpus >= 1
    if use_gpu:
        n = num_actors or int(gpus)
        if n > gpus:
            raise ResourceError(
                f"`{count_key}`={n} asks for more GPU {what} than the cluster's {gpus:g} GPUs; lower {count_key}."
            )
        threads = 1 if training else max(1, int(cpus // max(n, 1)) - 1)
        return ActorPlan(num_actors=n, num_cpus=1.0, num_gpus=1.0, torch_threads=threads)
    # On a multi-node cluster the total can exceed any single node: an actor sized from the total
    # (e.g. 3 CPUs on two 2-CPU nodes) stays pending forever.
    node_cpus = largest_node_cpus() or cpus
    if training:
        n = num_actors or 1
        if n > cpus:
            raise ResourceError(
                f"`{count_key}`={n} CPU workers need {n} CPUs, but the cluster has {cpus:g}; lower {count_key}."
            )
        per_worker = max(1, min(int(cpus // n), int(node_cpus)))  # a worker must fit on one node
        return ActorPlan(num_actors=n, num_cpus=float(per_worker), num_gpus=0.0, torch_threads=per_worker)
    if cpus < 2:
        raise ResourceError(f"the Ray cluster has {cpus:g} CPU; `{key}` needs at least 2 (one for reads).")
    # Leave one CPU for Ray Data's read tasks (an actor pool that takes every CPU deadlocks).
    available = cpus - 1.0
    threads = max(1, min(8, int(available), int(node_cpus)))
    n = num_actors or max(1, int(available // threads))
    per_actor = min(float(threads), available / n)
    per_actor = max(0.25, math.floor(per_actor * 4) / 4)
    # Reads are short and I/O-light, so each actor's torch may use the cores its share rounds to,
    # plus the read CPU on small machines where one idle core would otherwise halve throughput.
    torch_threads = max(1, int(min(cpus, node_cpus) // n)) if cpus <= 4 else max(1, int(per_actor))
    return ActorPlan(num_actors=n, num_cpus=per_actor, num_gpus=0.0, torch_threads=torch_threads)


def shutdown_if_started() -> None:
    """Disconnect from Ray only if `ensure_ray` connected this process (never a caller's Ray)."""
    global _started_here
    if _started_here:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _started_here = False


class _RowCounter:
    """Rows finished by workers, summed (a Ray actor: see `remote_progress`)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += int(n)

    def get(self) -> int:
        return self.rows


@contextmanager
def remote_progress(progress, every_s: float = 1.0) -> Iterator[object]:
    """A counter that workers tell how many rows they finished (`counter.add.remote(n)`, fire and
    forget), relayed to `progress` (a `pipeline.progress.Progress`) by a driver thread. For passes
    whose rows never reach the driver: the encode stage's workers write their codes themselves."""
    import ray

    counter = ray.remote(num_cpus=0)(_RowCounter).remote()
    stop = threading.Event()
    relayed = 0

    def relay() -> None:
        nonlocal relayed
        try:
            rows = ray.get(counter.get.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - progress is advisory: a slow answer skips one update
            return
        if rows > relayed:
            progress.update(rows - relayed)
            relayed = rows

    def loop() -> None:
        while not stop.wait(every_s):
            relay()

    thread = threading.Thread(target=loop, name="influcoder-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        relay()
        ray.kill(counter)
