"""The torch process group of scopeforge's Ray Train jobs (``ray_jobs.train_launch``).

- Devices: before the process group is set up, every worker that reserved a GPU checks that it sees one (one line
  naming the stage otherwise, instead of NCCL's "not built in" or a silent CPU run).
- Loopback: on the local instance that ``scopeforge`` starts, the torch rendezvous store listens on 127.0.0.1
  (torch's default TCPStore listens on every interface) and gloo / NCCL use the loopback interface. On a cluster the
  usual ``env://`` rendezvous on the node address is kept: workers on other nodes must reach it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from ray_jobs.runtime import LOOPBACK
from shared.placement import choose_device


@dataclass
class CheckedTorchConfig(TorchConfig):
    """TorchConfig whose workers check their GPUs before the process group forms; ``loopback`` (a single-node local
    instance): the rendezvous store and the collectives stay on 127.0.0.1."""

    stage: str = ""
    role: str = "training worker"
    loopback: bool = False

    @property
    def backend_cls(self):
        return _CheckedTorchBackend


@dataclass
class LoopbackTorchConfig(CheckedTorchConfig):
    """The loopback-only process group by itself (tests/test_listeners.py)."""

    loopback: bool = True


class _CheckedTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: CheckedTorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        if gpus > 0:
            worker_group.execute(_check_gpu, backend_config.stage, backend_config.role, gpus)
        if not backend_config.loopback:
            super().on_start(worker_group, backend_config)
            return
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        world = len(worker_group)
        port = worker_group.execute_single(0, _serve_store, world, backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join_group, backend, rank, world, port,
                                                   backend_config.timeout_s) for rank in range(world)])


def _check_gpu(stage: str, role: str, gpus: float) -> None:
    import torch

    ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    choose_device(stage, role, gpus, torch.cuda.device_count() if torch.cuda.is_available() else 0, ids)


_SERVER: Any = None
"""Rank 0's store server, kept alive for the life of the worker process."""


def _serve_store(world: int, timeout_s: int) -> int:
    """On rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    import torch.distributed as dist

    global _SERVER
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    _SERVER = (listener, dist.TCPStore(LOOPBACK, port, world, True, timeout=dt.timedelta(seconds=timeout_s),
                                       wait_for_workers=False, master_listen_fd=listener.fileno()))
    return port


def _join_group(backend: str, rank: int, world: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))
    timeout = dt.timedelta(seconds=timeout_s)
    store = _SERVER[1] if rank == 0 and _SERVER is not None else dist.TCPStore(LOOPBACK, port, world, False,
                                                                               timeout=timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore("scopeforge", store), rank=rank,
                            world_size=world, timeout=timeout)


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return "lo"
