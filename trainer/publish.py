"""Weight publishing: the trainer's new version reaches the inference servers (docs/architecture.md, Weight sync).

Two ways, one interface (`await publisher.publish(version, tensors) -> WeightsPublished`):
  disk         safetensors + the base model's config and tokenizer under `dir/vXXXXXXXX/`, written under
               a temporary name, fsynced and renamed (a server never loads half a version), the newest
               `keep_last` kept; the engine then calls each server's /update_weights_from_disk.
  distributed  a torch.distributed group with the servers, laid out as SGLang's contract describes
               (docs/sglang.md §3): the trainer is rank 0 and hosts the rendezvous.
               It announces the version first (a pending notice naming the rendezvous, the tensors and
               their buckets), forms the group if there is none, and broadcasts bucket by bucket; the
               engine has its servers join and receive each bucket under its pause policy.
Invariant: the trainer never calls a server. The engine is the one owner of every update, so its pause
policy holds around disk and distributed updates alike.
Each publish records its bytes and seconds, so the daemon reports time against bytes / bandwidth.
"""

import asyncio
import hashlib
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path

import msgspec
from tidal.protocol.errors import TidalError
from tidal.protocol.messages import DiskWeights, DistributedWeights, WeightsPublished
from tidal.trainer.config import DiskPublish, DistributedPublish

__all__ = ["Announce", "PublishError", "DiskPublisher", "DistributedPublisher", "make_publisher"]

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
_SAME_GPU = ("NCCL refused the group: two of its processes are on one GPU (NCCL's 'Duplicate GPU detected'); "
             "give the trainer and each server a GPU of its own, or set publish.backend = 'gloo'")


Announce = Callable[[WeightsPublished], Awaitable[None]]
"""Sends a weights notice on the status channel now (the daemon's StatusPublisher.publish)."""


class PublishError(TidalError, RuntimeError):
    """A version could not be published: a write failed, or a broadcast did (the message names the
    group and the cause)."""


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class DiskPublisher:
    """Writes each version as a from_pretrained-loadable directory in a shared folder."""

    def __init__(self, cfg: DiskPublish, base_model: str):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.base_model = Path(base_model)
        self.last_bytes = 0
        self.last_seconds = 0.0

    async def start(self) -> None:
        """Nothing to set up; present so both publishers share one lifecycle."""

    async def close(self) -> None:
        """Nothing to tear down."""

    async def publish(self, version: int, tensors: Mapping) -> WeightsPublished:
        """`write` in a thread, so the event loop (intake, status) runs while the file is written."""
        return await asyncio.to_thread(self.write, version, tensors)

    def published(self, *, after: int = -1) -> list[Path]:
        """Version directories in `dir` newer than `after`, oldest first."""
        return [p for p in sorted(self.dir.glob("v[0-9]*")) if p.name[1:].isdigit() and int(p.name[1:]) > after]

    def write(self, version: int, tensors: Mapping) -> WeightsPublished:
        """Publish synchronously: write `tensors` as version `version` (atomically: a temporary
        directory renamed to `vXXXXXXXX`), drop versions beyond `keep_last`, and return the notice to
        send. For callers without an event loop; `publish` is the same in a thread."""
        from safetensors.torch import save_file
        from tidal.trainer.checkpoint import _fsync_dir, _fsync_file, untie

        t0 = time.perf_counter()
        final = self.dir / f"v{version:08d}"
        tmp = self.dir / f".tmp-{final.name}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if self.base_model.is_dir():  # config, generation config, tokenizer: everything but weights
                weights = {p for pattern in _WEIGHT_FILES for p in self.base_model.glob(pattern)}
                for f in self.base_model.iterdir():
                    if f.is_file() and f not in weights:
                        shutil.copy2(f, tmp / f.name)
            save_file(untie(dict(tensors)), tmp / "model.safetensors", metadata={"format": "pt"})
            with open(tmp / "model.safetensors", "rb") as f:
                checksum = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            nbytes = (tmp / "model.safetensors").stat().st_size
            for f in tmp.iterdir():  # durable before the name says the version is whole (a power loss)
                _fsync_file(f)
            _fsync_dir(tmp)
        except Exception as exc:  # OSError, or safetensors' own error type for ENOSPC
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free there"
            except OSError:
                free = "free space unknown"
            raise PublishError(f"publish.dir {self.dir}: writing version {version} failed ({free}): "
                               f"{type(exc).__name__}: {exc}"[:1000]) from exc
        if final.exists():  # republished after a resume: swap, so the name always holds a whole version
            old = self.dir / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(self.dir)
        for newer in self.published(after=version):  # a lost future (published after the checkpoint resumed)
            shutil.rmtree(newer, ignore_errors=True)
        for old in sorted(self.dir.glob("v[0-9]*"))[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_bytes, self.last_seconds = nbytes, time.perf_counter() - t0
        return WeightsPublished(
            version=version, source=DiskWeights(str(final.resolve())), checksum=checksum,
            nbytes=nbytes, published_at=time.time(),
        )


def init_weights_group(backend: str, store, world_size: int, group_name: str, timeout_s: float):
    """Rank 0's side of the weight-update group, laid out as SGLang's `init_custom_process_group`:
    the group's keys under "{group_name}/" and the backend's under "{group_name}/{device}/" of the
    TCPStore this trainer hosts, so an SGLang server (or engine/reference) joins unchanged.
    Public APIs only; the group is independent of any torchrun default group."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    device = "cuda" if backend == "nccl" else "cpu"
    prefix = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", store))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # else NCCL's 10 minutes: a server that never posts its receive hangs a publish
        return dist.ProcessGroupNCCL(prefix, 0, world_size, options)
    return dist.ProcessGroupGloo(prefix, 0, world_size, timeout)


class DistributedPublisher:
    """Rank 0 of the weight-update group: announces each version, then broadcasts it bucket by bucket.

    The servers are the engine's: it has them join and receive under its pause policy. This side
    only hosts the rendezvous and sends, so it needs nothing of the servers but their rank count.
    """

    def __init__(self, cfg: DistributedPublish, announce: Announce):
        """`announce(notice)` sends a weights notice on the status channel (the daemon's publisher)."""
        self.cfg = cfg
        self.announce = announce
        self.world_size = 1 + cfg.server_ranks
        self.port = cfg.master_port
        self.group_id = ""
        self.last_bytes = 0
        self.last_seconds = 0.0
        self._store = None
        self._group = None

    async def start(self) -> None:
        """Nothing to set up: the group forms at the first publish, once its notice is out."""

    async def close(self) -> None:
        """Drop the group and the rendezvous; the servers' side of it fails from then on, and the
        engine has them leave it when the next notice names another group."""
        self._drop()

    def _drop(self) -> None:
        self._group = None
        self._store = None

    def _host(self) -> None:
        """A new rendezvous (a fresh store: a formed group's keys cannot serve a second formation)
        and a new group id, so the engine knows its servers must join again."""
        from torch.distributed import TCPStore

        self._drop()
        # TCPStore alone listens on every interface; the rendezvous is unauthenticated, so it listens on
        # master_address only (loopback by default): a socket bound here is handed to the store.
        family = socket.AF_INET6 if ":" in self.cfg.master_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.cfg.master_address, self.cfg.master_port))
        listener.listen(128)
        port = listener.getsockname()[1]
        fd = listener.detach()  # the store owns the descriptor from here on, and closes it
        self._store = TCPStore(
            self.cfg.master_address, port, self.world_size, is_master=True,
            timeout=timedelta(seconds=self.cfg.timeout_s), wait_for_workers=False, master_listen_fd=fd,
        )
        self.port = self._store.port
        self.group_id = secrets.token_hex(8)

    def _buckets(self, tensors: Mapping) -> list[list[tuple[str, object]]]:
        """Tensors in order, cut into buckets of about `bucket_mb`; with `flatten`, one dtype per bucket."""
        limit = self.cfg.bucket_mb * 2**20
        buckets: list[list] = [[]]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            other_dtype = self.cfg.flatten and buckets[-1] and buckets[-1][-1][1].dtype != t.dtype
            if buckets[-1] and (size + nbytes > limit or other_dtype):
                buckets.append([])
                size = 0
            buckets[-1].append((name, t))
            size += nbytes
        return buckets

    def _broadcast(self, bucket) -> None:
        """Broadcast one bucket and wait until it is sent (or `timeout_s` passes). NCCL sends from the
        GPU, so tensors held on the CPU (the daemon's overlap copy) go there first; its wait() only
        orders streams, hence the synchronize before the bucket counts as sent."""
        import torch

        device = "cuda" if self.cfg.backend == "nccl" else None
        tensors = [t.detach().to(device) for _, t in bucket]
        if self.cfg.flatten:  # one collective per bucket: latency once, one memcpy to pack
            tensors = [torch.cat([t.reshape(-1) for t in tensors])]
        for t in tensors:
            self._group.broadcast(t.contiguous(), 0).wait()
        if device is not None:
            torch.cuda.current_stream().synchronize()

    def _notice(self, version: int, tensors: Mapping, buckets: list, nbytes: int) -> WeightsPublished:
        return WeightsPublished(
            version=version,
            source=DistributedWeights(
                master_address=self.cfg.master_address, master_port=self.port,
                group_name=self.cfg.group_name, world_size=self.world_size, backend=self.cfg.backend,
                names=list(tensors), dtypes=[_dtype_name(t) for t in tensors.values()],
                shapes=[list(t.shape) for t in tensors.values()], buckets=[len(b) for b in buckets],
                flatten=self.cfg.flatten, group_id=self.group_id, pending=True,
            ),
            nbytes=nbytes, published_at=time.time(),
        )

    async def publish(self, version: int, tensors: Mapping) -> WeightsPublished:
        """Announce `version` (a pending notice), form the group if there is none (blocking until the
        servers join), broadcast every bucket; return the notice with `pending` false, for the daemon
        to send. The servers serve `version` once the engine has seen their last bucket through.

        Any failure (the servers never joined, one vanished mid-broadcast) drops the group: the closed
        notice goes out, PublishError names the group and the cause, and the next publish (the daemon
        tries the same version again) forms a new group, with a new id, so the engine has its servers
        join again.
        """
        t0 = time.perf_counter()
        buckets = self._buckets(tensors)
        forming = self._group is None
        if forming:
            try:
                self._host()
            except (RuntimeError, OSError) as exc:  # the port is taken, the address is not this host's
                raise PublishError(f"publishing version {version}: cannot host the rendezvous at "
                                   f"{self.cfg.master_address}:{self.cfg.master_port}: {exc}") from None
        where = f"group {self.cfg.group_name!r} at {self.cfg.master_address}:{self.port}"
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        notice = self._notice(version, tensors, buckets, nbytes)
        closed = msgspec.structs.replace(notice, source=msgspec.structs.replace(notice.source, pending=False))
        await self.announce(notice)
        try:
            if forming:
                self._group = await asyncio.to_thread(
                    init_weights_group, self.cfg.backend, self._store, self.world_size, self.cfg.group_name,
                    self.cfg.timeout_s,
                )
            for bucket in buckets:
                # gloo cannot be cancelled: each broadcast ends, sent or failed, within timeout_s
                await asyncio.to_thread(self._broadcast, bucket)
        except (RuntimeError, TimeoutError, OSError) as exc:
            self._drop()
            await self.announce(closed)
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            cause = _SAME_GPU if "Duplicate GPU" in str(exc) else lines[0][:300]
            raise PublishError(
                f"publishing version {version} over {where} ({self.world_size - 1} server ranks) failed: "
                f"{cause}; the next try forms a new group"
            ) from None
        self.last_bytes = nbytes
        self.last_seconds = time.perf_counter() - t0
        return closed


def make_publisher(cfg, base_model: str, announce: Announce | None = None) -> DiskPublisher | DistributedPublisher | None:
    """The publisher a `publish` config section names (None for type = "none"); a distributed one
    needs `announce`, which sends a notice on the status channel before the publish ends."""
    match cfg:
        case DiskPublish():
            return DiskPublisher(cfg, base_model)
        case DistributedPublish():
            if announce is None:
                raise ValueError("a distributed publisher announces each version before it broadcasts: pass announce")
            return DistributedPublisher(cfg, announce)
    return None
