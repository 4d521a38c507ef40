"""Where a worker rank runs and how its group talks: the device, torch threads, the process group and FSDP.

With `trainer.world_size` > 1 the driver starts that many ranks of each worker; they form a torch.distributed
group (NCCL on GPU, Gloo on CPU) and shard their model with FSDP2 (`fully_shard` on every decoder layer and on
the root).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

import torch

from zerosearch.config import Config


def pick_device(cfg: Config) -> torch.device:
    if cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def release_memory() -> None:
    """Hand freed heap back to the OS: without it glibc keeps the peak of every update's activations
    (several GiB for a 135M model on CPU) and the process only grows."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def setup_threads() -> None:
    # Ray sets OMP_NUM_THREADS=1 for actors with fractional CPUs; the workers take turns, so each may
    # use every core while it runs.
    n = int(os.environ.get("ZEROSEARCH_TORCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)



@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where one rank of a worker group sits: `rank` of `world`, rendezvous at `addr:port`, or through the
    file `store` when every rank is on this node (no TCP store: it would listen on all interfaces)."""

    rank: int = 0
    world: int = 1
    addr: str = "127.0.0.1"
    port: int = 0
    store: str = ""


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the worker group's process group (before the rollout engine, which then reuses it)."""
    import torch.distributed as dist

    if info.world <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.store:
        # One node: rendezvous through a file, and the backends' own sockets on loopback, so nothing of the
        # group listens on a network interface (torch's TCPStore binds every interface, whatever its host).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        init_method = f"file://{info.store}"
    else:
        init_method = f"tcp://{info.addr}:{info.port}"
    dist.init_process_group(backend, init_method=init_method, rank=info.rank, world_size=info.world)


def shard_fsdp(net: torch.nn.Module, lm, device: torch.device, gather_dtype: torch.dtype | None = None) -> None:
    """FSDP2: every decoder layer its own unit, the rest (embeddings, tied head, norm) in the root.

    With `gather_dtype` (the autocast dtype, `model.fsdp_mixed_precision`) the decoder layers are all-gathered in
    that dtype and their gradients reduced in fp32, as verl's FSDP mixed precision: half the all-gather traffic
    and unsharded memory of fp32, and the same arithmetic, since autocast casts the weights of every matmul to that
    dtype anyway. Their inputs are not cast (`cast_forward_inputs=False`): the residual stream stays fp32, as in
    one process under autocast. The root keeps fp32, so the vocabulary head's forward stays fp32 (`heads.py`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy() if gather_dtype is None else MixedPrecisionPolicy(
        param_dtype=gather_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in getattr(lm.base_model, "layers", []):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded (DTensor) parameter; a plain tensor as it is. Collective."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

