"""Which Ray a command runs on: a cluster it joins (`--address`, or RAY_ADDRESS in a `ray job
submit` job), or a local instance it starts (`init_address`: even beside a `ray start`
cluster), sized for the run, with the settings that keep short local runs quick. Also what
one pretraining holds of it (`cpus_per_run`), whether the GPUs it asks for are there
(`check_local_gpus`), what to say of a run left on CPU (`cpu_training_note`), and of paths on
a cluster that only the driver's node sees (`warn_node_local_paths`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import ray
import torch

from svt_ray import data
from svt_ray.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

# Environment of a local Ray instance that `ensure_ray` starts (its processes inherit it; a
# value the user set wins). Ray Train's controller polls its workers every 2 s by default and
# acts on a finished run or a registered checkpoint only at a poll: about 6 s of a 29 s test
# run on 2 cores. At 0.5 s the same run takes 21-24 s. Clusters keep Ray's default.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def cpus_per_run(config: ExperimentConfig) -> float:
    """Logical CPUs one pretraining holds: its Train workers, its decode actor and one CPU for
    Ray Data's read tasks. A run whose Data cannot get a CPU waits forever (ray_notes.md §6.3)."""
    scaling = config.scaling
    return scaling.num_workers * scaling.cpus_per_worker + config.data.decode_cpus + 1


def local_ray_cpus(needed: float) -> int:
    """Logical CPUs for a local Ray instance: the machine's cores, or more when a run needs
    more (a laptop with 2 cores running 2 workers). Over-declaring is safe here: every Train
    worker and decode actor sets its own torch thread count."""
    return max(os.cpu_count() or 1, math.ceil(needed))


def joins_a_cluster(address: str | None) -> bool:
    """Whether Ray runs on a cluster rather than on a local instance this process starts: an
    address given, or RAY_ADDRESS (set in a `ray job submit` job), which `ray.init()` joins."""
    if address:
        return address != "local"
    return os.environ.get("RAY_ADDRESS", "local") not in ("", "local")


def no_cluster_message(where: str, reason: object) -> str:
    return (
        f"scaling.address: no Ray cluster answers at {where} ({reason}); start one (`ray start "
        "--head`, or `ray up ray_cluster.yaml`), or leave out --address for a local Ray instance"
    )


def check_cluster_answers(address: str, from_env: bool = False, timeout_s: float = 10.0) -> None:
    """A cluster named by HOST:PORT (or ray://HOST:PORT) must take a connection: `ray.init`
    retries an address where nothing listens for minutes, printing only its own C++ warnings.
    'auto' (the address `ray start` recorded) and other forms are left to Ray."""
    import socket

    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host or "://" in host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        where = f"{address} (RAY_ADDRESS)" if from_env else address
        raise ConfigError(no_cluster_message(where, error.strerror or error)) from None


def init_address(address: str | None, to_join: str = "pass --address auto") -> str | None:
    """What `ray.init` is given for `address`: it, or None in a `ray job submit` job (RAY_ADDRESS
    names the cluster), else "local": a new local instance even where `ray start` left one
    running on this machine, which a bare `ray.init()` would join (refusing `num_cpus`). For a
    local instance, `LOCAL_RAY_ENV` is set first (values the user set win), and Ray's warning
    that it turned token authentication on, its default, is left out of every command's output
    (setting RAY_AUTH_MODE instead would come after `import ray` read it)."""
    if joins_a_cluster(address):
        check_cluster_answers(address or os.environ["RAY_ADDRESS"], from_env=not address)
        return address
    if address is None and (running := _ray_start_cluster()):
        logger.warning(
            "a Ray cluster that `ray start` started runs on this machine (%s); this command "
            "starts a Ray instance of its own beside it. To run on that cluster, %s",
            running, to_join,
        )  # fmt: skip
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _default_auth_note not in auth_logger.filters:
        auth_logger.addFilter(_default_auth_note)
    return "local"


# Filesystems that live on one machine's own disk (or memory): a path on them names another
# folder, or nothing, on every other node. Network and FUSE filesystems are taken as shared.
NODE_LOCAL_FILESYSTEMS = {
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "vfat", "exfat", "ntfs", "overlay",
    "tmpfs", "ramfs",
}  # fmt: skip


def warn_node_local_paths(paths: dict[str, str | None]) -> None:
    """[driver, on a cluster] Say which of `paths` ({flag: path}) are on this node's own disk:
    Train workers and Ray Data readers on other nodes read and write their own folder of that
    name, so checkpoints scatter over the nodes (a resume elsewhere finds none, a lost node
    takes its own) and shards are missing there. A file:// URI names a local path too."""
    for flag, path in paths.items():
        local = path.removeprefix("file://") if path else path
        if (
            not local
            or "://" in local
            or (kind := _filesystem_type(local)) not in NODE_LOCAL_FILESYSTEMS
        ):
            continue
        logger.warning(
            "%s %s is on this node's own disk (%s): on a cluster of more than one node (or one "
            "the autoscaler grows) the other nodes do not see it; give storage every node "
            "reaches, s3://, gs:// or an NFS mount (README, On a cluster)", flag, path, kind,
        )  # fmt: skip


def _filesystem_type(path: str, mounts_file: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem `path` is on (Linux's mount table), None if unknown."""
    try:
        with open(mounts_file) as mounts:
            table = [line.split()[1:3] for line in mounts if len(line.split()) >= 3]
    except OSError:
        return None
    where = os.path.realpath(os.path.expanduser(path))
    best = None
    for mount, kind in table:
        mount = mount.replace("\\040", " ")
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):  # the last one mounted
            best = (mount, kind)
    return best[1] if best else None


def _ray_start_cluster() -> str | None:
    """The address `ray start` recorded on this machine for a bare `ray.init()` to join (it
    is removed by `ray stop`), None when there is none."""
    try:
        from ray._private.utils import read_ray_address  # Ray's own record, no public API

        return read_ray_address()
    except Exception:  # another Ray version's layout: no notice, nothing else changes
        return None


def _default_auth_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def ensure_ray(address: str | None, num_cpus: int | None = None, **options: Any) -> None:
    """Connect to `address` (or to RAY_ADDRESS, as in a `ray job submit` job), or start a local
    Ray instance with `num_cpus` logical CPUs (and `LOCAL_RAY_ENV`, unless the user set those
    variables). Ray refuses `num_cpus` when joining a cluster."""
    if not ray.is_initialized():
        options.setdefault("log_to_driver", True)
        cluster = joins_a_cluster(address)
        try:
            ray.init(
                address=init_address(address), num_cpus=None if cluster else num_cpus, **options
            )
        except ConnectionError as error:
            where = address or os.environ.get("RAY_ADDRESS")
            raise ConfigError(no_cluster_message(str(where), error)) from None
    data.set_progress_bars(data.progress_bars_wanted())  # for datasets the driver runs itself


def check_local_gpus(config: ExperimentConfig) -> None:
    """[driver] A local Ray instance has the GPUs of this machine and no more: a run that asks
    for more would wait for them (`train.wait_for_workers_s`, 20 minutes by default) and then
    fail. On a cluster (`scaling.address`, or RAY_ADDRESS as in a `ray job submit` job, which
    `ray.init()` joins) the autoscaler may still add GPUs, so it is not checked there."""
    scaling = config.scaling
    needed = scaling.num_workers * scaling.gpus_per_worker
    if joins_a_cluster(scaling.address) or not needed:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < needed:
        raise ConfigError(
            f"scaling.gpus_per_worker: {scaling.num_workers} worker(s) x "
            f"{scaling.gpus_per_worker:g} GPU need {needed:g} GPU(s), and the local Ray instance "
            f"has {have:g}; pass --gpus-per-worker 0 to train on CPU, fewer --workers, or the "
            "--address of a cluster with GPUs"
        )


def cpu_training_note(config: ExperimentConfig) -> str | None:
    """[driver] What to say about a run that trains on CPU (`scaling.gpus_per_worker` is 0 by
    default) where that is likely a slip: this machine has GPUs the run leaves idle, or the
    model is far beyond what a CPU trains in useful time (the paper's ViT-B: days an epoch)."""
    scaling, model = config.scaling, config.model
    if scaling.gpus_per_worker:
        return None
    gpus = 0 if joins_a_cluster(scaling.address) else torch.cuda.device_count()
    if gpus:
        return (
            f"this machine has {gpus} CUDA GPU(s) and the run uses none: pass "
            "--gpus-per-worker 1 to train on them"
        )
    # The blocks' weights: spatial and temporal attention (4 d^2 each), temporal fc (d^2),
    # MLP (8 d^2). The paper preset: 120M (its backbone, with the embeddings: 121.3M).
    parameters = 17 * model.depth * model.embed_dim**2
    if parameters < 20e6:
        return None
    return (
        f"the {config.preset} preset's model (~{parameters / 1e6:.0f}M parameters) trains on "
        "CPU: expect days an epoch. --gpus-per-worker 1 trains on GPUs; --preset tiny is the "
        "CPU recipe"
    )
