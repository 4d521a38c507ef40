"""Ray plumbing: start (or join) Ray, and run each worker as a group of ranks, one per GPU (placement bundles),
that rendezvous into one torch.distributed group (see `distributed`)."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import torch

from zerosearch.config import Config
from zerosearch.training.distributed import DistInfo


def start_ray(cfg: Config, stack: ExitStack):
    """Join `ray.address`, or start a local Ray with every listener on 127.0.0.1 (stopped by us)."""
    if not cfg.ray.address:
        # Read by Ray when it is first imported: a local Ray then uses the loopback address, and every
        # listener (GCS, raylet, workers, object manager) binds 127.0.0.1 instead of all interfaces.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray starts workers at nice 15; ours do the heavy work, so they should not yield to the simulator.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        temp_dir = Path(f"/tmp/zs-ray-{os.getpid()}")
        ray.init(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            num_gpus=cfg.trainer.n_gpus_per_node if torch.cuda.is_available() else 0,
            include_dashboard=False,
            object_store_memory=int(cfg.ray.object_store_gib * 2**30),
            _temp_dir=str(temp_dir),
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
        stack.callback(lambda: __import__("shutil").rmtree(temp_dir, ignore_errors=True))
    stack.callback(ray.shutdown)
    return ray


def world_size(cfg: Config) -> int:
    """Ranks per worker group: `trainer.world_size`, or one per GPU of the cluster (1 on CPU)."""
    t = cfg.trainer
    if t.world_size:
        return t.world_size
    if torch.cuda.is_available() and t.n_gpus_per_node > 0:
        return t.n_gpus_per_node * t.nnodes
    return 1


class WorkerGroup:
    """The ranks of one worker (actor, reference or critic) behind one handle.

    `call` runs a method on every rank with the same arguments; `scatter` gives rank r the r-th
    argument tuple.
    """

    def __init__(self, ray, handles: list):
        self.ray, self.handles = ray, handles

    @property
    def world(self) -> int:
        return len(self.handles)

    def call(self, method: str, *args) -> list:
        return self.ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def scatter(self, method: str, per_rank: list[tuple]) -> list:
        return self.ray.get([getattr(h, method).remote(*args) for h, args in zip(self.handles, per_rank)])


def split(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(n), sizes differing by at most one."""
    bounds = [n * r // parts for r in range(parts + 1)]
    return [slice(bounds[r], bounds[r + 1]) for r in range(parts)]


def _rendezvous_address(multi_node: bool) -> tuple[str, int]:
    """Host and a free port for rank 0's store: this node's address only when ranks span nodes, else loopback."""
    import socket

    host = "" if multi_node else "127.0.0.1"
    with socket.socket() as sock:
        sock.bind((host, 0))
        if not multi_node:
            return "127.0.0.1", sock.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def multi_node(cfg: Config) -> bool:
    """Whether a worker group's ranks may sit on several nodes (`trainer.nnodes` > 1)."""
    return cfg.trainer.nnodes > 1


def start_group(ray, cls, cfg: Config, world: int, share: float, placement, *args) -> WorkerGroup:
    """`world` ranks of `cls`; rank r runs in placement bundle r (its GPU) when there is a placement group.

    `share` is the fraction of a GPU each rank takes: the actor, reference and critic ranks of one bundle
    share its GPU, as veRL's colocated workers do.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def where(rank: int) -> dict:
        if placement is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)}

    addr, port, store = "127.0.0.1", 0, ""
    if world > 1 and multi_node(cfg):  # rank 0's node hosts the process group's TCP store
        addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous_address).options(**where(0)).remote(True))
    elif world > 1:  # one node: a file store, nothing listening on the network (see distributed.init_distributed)
        import tempfile
        import uuid

        store = os.path.join(tempfile.gettempdir(), f"zs-rdzv-{uuid.uuid4().hex}")
    gpus = share if placement is not None else 0
    # Fractional CPUs: the workers take turns, and each sets its own torch thread count.
    remote_cls = ray.remote(num_cpus=0.1 if placement is None else 0.01, num_gpus=gpus, max_restarts=0)(cls)
    return WorkerGroup(ray, [remote_cls.options(**where(r)).remote(cfg, *args, DistInfo(r, world, addr, port, store))
                             for r in range(world)])


def gpu_placement(ray, cfg: Config, world: int, stack: ExitStack):
    """One bundle (1 GPU) per rank, packed onto as few nodes as possible; None on CPU."""
    if not (torch.cuda.is_available() and cfg.trainer.n_gpus_per_node > 0):
        return None
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"GPU": 1, "CPU": 1}] * world, strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    stack.callback(remove_placement_group, pg)
    return pg
