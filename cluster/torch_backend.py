"""Ray Train's torch backend, with rank 0's rendezvous store on loopback when it can be.

Why: ``torch.distributed``'s ``TCPStore`` server (rank 0 hosts it for ``env://``) binds every
interface whatever ``MASTER_ADDR`` says, and torch has no option for the bind address. On an
embedded Ray the node address, and so ``MASTER_ADDR``, is 127.0.0.1: nothing off the machine
could take part in the run, but anyone on the network could reach the store. Here each
worker, before Ray Train sets up the process group, gets a ``TCPStore`` that hands the
server a socket already bound to the loopback address (``master_listen_fd``). With any
other ``MASTER_ADDR`` (a cluster) the store is torch's own, unchanged. Gloo's own listeners
follow ``GLOO_SOCKET_IFNAME``, which the embedded Ray sets to the loopback interface.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

__all__ = ["LoopbackStoreTorchConfig", "use_loopback_store"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def use_loopback_store() -> None:
    """In this process, makes ``env://`` and ``tcp://`` rendezvous on a loopback
    ``MASTER_ADDR`` host their store on a loopback socket."""
    import importlib

    from torch.distributed import TCPStore

    # The module: `torch.distributed.rendezvous` as an attribute is the function of that name.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    if getattr(rendezvous.TCPStore, "mve_loopback", False):
        return

    def store(host_name: str, port: int, *args: Any, **kwargs: Any) -> TCPStore:
        is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
        if is_master and _is_loopback(host_name) and "master_listen_fd" not in kwargs:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(socket.SOMAXCONN)
            kwargs["master_listen_fd"] = sock.detach()  # the store owns and closes it
        return TCPStore(host_name, port, *args, **kwargs)

    store.mve_loopback = True  # type: ignore[attr-defined]
    rendezvous.TCPStore = store


class _LoopbackStoreBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(use_loopback_store)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose workers host a loopback ``MASTER_ADDR``'s store on loopback."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackStoreBackend
