"""Weight publishing: the trainer's new version reaches the inference servers (docs/architecture.md, Weight sync).

Two ways, one interface (`await publisher.publish(version, tensors) -> WeightsPublished`):
  disk         safetensors + the base model's config and tokenizer under `dir/vXXXXXXXX/`, written under
               a temporary name and renamed (a server never loads half a version), the newest
               `keep_last` kept; the engine then calls each server's /update_weights_from_disk.
  distributed  a torch.distributed group with the servers, as SGLang's contract describes
               (docs/sglang.md §3): the trainer is rank 0 and hosts the rendezvous;
               each server joins through /init_weights_update_group; per bucket of parameters the
               trainer posts /update_weights_from_distributed (names, dtypes, shapes) and broadcasts
               the same tensors in the same order while that call is pending.
Each publish records its bytes and seconds, so the daemon reports time against bytes / bandwidth.
The trainer never imports engine: the HTTP calls use aiohttp and tidal.protocol.sglang's structs.
"""

import asyncio
import hashlib
import shutil
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import msgspec
from tidal.protocol.errors import TidalError
from tidal.protocol.messages import DiskWeights, DistributedWeights, WeightsPublished
from tidal.protocol.sglang import (
    BeginWeightUpdateRequest,
    DestroyWeightsUpdateGroupRequest,
    EndWeightUpdateRequest,
    InitWeightsUpdateGroupRequest,
    UpdateWeightsFromDistributedRequest,
)
from tidal.trainer.config import DiskPublish, DistributedPublish

__all__ = ["PublishError", "DiskPublisher", "DistributedPublisher", "make_publisher"]

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
_SAME_GPU = ("NCCL refused the group: two of its processes are on one GPU (NCCL's 'Duplicate GPU detected'); "
             "give the trainer and each server a GPU of its own, or set publish.backend = 'gloo'")


class PublishError(TidalError, RuntimeError):
    """A server refused or failed a weight update; the message names the server and its answer."""


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

    def write(self, version: int, tensors: Mapping) -> WeightsPublished:
        """Publish synchronously: write `tensors` as version `version` (atomically: a temporary
        directory renamed to `vXXXXXXXX`), drop versions beyond `keep_last`, and return the notice to
        send. For callers without an event loop; `publish` is the same in a thread."""
        from safetensors.torch import save_file
        from tidal.trainer.checkpoint import untie

        t0 = time.perf_counter()
        final = self.dir / f"v{version:08d}"
        tmp = self.dir / f".tmp-{final.name}"
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
        if final.exists():  # republished after a resume: swap, so the name always holds a whole version
            old = self.dir / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
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
    """Broadcasts parameters to the servers over a torch.distributed group (trainer = rank 0)."""

    def __init__(self, cfg: DistributedPublish):
        if not cfg.servers:
            raise PublishError("publish.servers is empty: distributed publishing needs at least one server")
        self.cfg = cfg
        self.world_size = 1 + len(cfg.servers)
        self.port = cfg.master_port
        self.last_bytes = 0
        self.last_seconds = 0.0
        self._store = None
        self._group = None
        self._http = None
        self._sessions = True  # begin/end_weight_update exist until a server answers 404

    async def start(self) -> None:
        """Open the HTTP session and form the group."""
        import aiohttp

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        await self._form()

    async def _form(self) -> None:
        """Host the rendezvous, then form the group with every server (their HTTP calls block until then)."""
        from torch.distributed import TCPStore

        self._store = TCPStore(
            self.cfg.master_address, self.cfg.master_port, self.world_size, is_master=True,
            timeout=timedelta(seconds=self.cfg.timeout_s), wait_for_workers=False,
        )
        self.port = self._store.port
        calls = [
            self._post(url, "/init_weights_update_group", InitWeightsUpdateGroupRequest(
                master_address=self.cfg.master_address, master_port=self.port, rank_offset=1 + i,
                world_size=self.world_size, group_name=self.cfg.group_name, backend=self.cfg.backend,
            ))
            for i, url in enumerate(self.cfg.servers)
        ]
        join = asyncio.to_thread(
            init_weights_group, self.cfg.backend, self._store, self.world_size, self.cfg.group_name,
            self.cfg.timeout_s,
        )
        results = await asyncio.gather(join, *calls)
        self._group = results[0]

    async def _leave(self) -> None:
        """Best effort: every server leaves the group, then this side drops it (and its rendezvous)."""
        req = DestroyWeightsUpdateGroupRequest(group_name=self.cfg.group_name)
        await asyncio.gather(
            *(self._post(url, "/destroy_weights_update_group", req) for url in self.cfg.servers),
            return_exceptions=True,
        )
        self._group = None
        self._store = None

    async def close(self) -> None:
        """Leave the group on every server, then locally; close the HTTP session."""
        if self._group is not None:
            await self._leave()
        if self._http is not None:
            await self._http.close()
            self._http = None

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
        """Broadcast one bucket and wait until it is sent. NCCL sends from the GPU, so tensors held on
        the CPU (the daemon's overlap copy) go there first; its wait() only orders streams, hence the
        synchronize before the bucket counts as sent."""
        import torch

        device = "cuda" if self.cfg.backend == "nccl" else None
        tensors = [t.detach().to(device) for _, t in bucket]
        if self.cfg.flatten:  # one collective per bucket: latency once, one memcpy to pack
            tensors = [torch.cat([t.reshape(-1) for t in tensors])]
        for t in tensors:
            self._group.broadcast(t.contiguous(), 0).wait()
        if device is not None:
            torch.cuda.current_stream().synchronize()

    async def publish(self, version: int, tensors: Mapping) -> WeightsPublished:
        """Send every tensor to every server; the servers serve `version` when this returns.

        Any failure (a server refused, restarted or vanished) leaves the group broken: it is left on
        every server, PublishError names the servers and the cause, and the next publish forms it again.
        """
        import aiohttp

        t0 = time.perf_counter()
        try:
            if self._group is None:
                await self._form()
            await self._send(version, tensors)
        except (PublishError, RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            await self._leave()
            raise PublishError(
                f"publishing version {version} to {', '.join(self.cfg.servers)} failed: {exc}; "
                "the group is formed again for the next version"
            ) from None
        self.last_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.last_seconds = time.perf_counter() - t0
        return WeightsPublished(
            version=version,
            source=DistributedWeights(
                master_address=self.cfg.master_address, master_port=self.port,
                group_name=self.cfg.group_name, world_size=self.world_size, backend=self.cfg.backend,
                names=list(tensors), dtypes=[_dtype_name(t) for t in tensors.values()],
                shapes=[list(t.shape) for t in tensors.values()],
            ),
            nbytes=self.last_bytes, published_at=time.time(),
        )

    async def _send(self, version: int, tensors: Mapping) -> None:
        if self._sessions:
            begun = await self._post_all("/begin_weight_update", BeginWeightUpdateRequest(), allow_404=True)
            self._sessions = all(begun)
        try:
            buckets = self._buckets(tensors)
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1
                req = UpdateWeightsFromDistributedRequest(
                    names=[n for n, _ in bucket], dtypes=[_dtype_name(t) for _, t in bucket],
                    shapes=[list(t.shape) for _, t in bucket], group_name=self.cfg.group_name,
                    flush_cache=last, weight_version=str(version) if last else None,
                    load_format="flattened_bucket" if self.cfg.flatten else None,
                )
                # Both sides run to the end, so no broadcast outlives its bucket: a server that refuses
                # the call posts no receive and the broadcast fails after `timeout_s` (gloo cannot be
                # cancelled); one that died fails it at once.
                results = await asyncio.gather(
                    self._post_all("/update_weights_from_distributed", req),
                    asyncio.to_thread(self._broadcast, bucket),
                    return_exceptions=True,
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                if any("Duplicate GPU" in str(e) for e in errors):
                    raise PublishError(_SAME_GPU)
                if errors:
                    raise errors[0]
        except BaseException:
            if self._sessions:
                await asyncio.gather(
                    *(self._post(url, "/end_weight_update", EndWeightUpdateRequest()) for url in self.cfg.servers),
                    return_exceptions=True,
                )
            raise
        if self._sessions:
            await self._post_all("/end_weight_update", EndWeightUpdateRequest())

    async def _post_all(self, path: str, req, *, allow_404: bool = False) -> list[bool]:
        return await asyncio.gather(*(self._post(url, path, req, allow_404=allow_404) for url in self.cfg.servers))

    async def _post(self, url: str, path: str, req, *, allow_404: bool = False) -> bool:
        """POST one control call; True on success, False on an allowed 404, PublishError otherwise."""
        async with self._http.post(
            url.rstrip("/") + path, data=msgspec.json.encode(req), headers={"Content-Type": "application/json"}
        ) as resp:
            body = await resp.text()
            if resp.status == 404 and allow_404:
                return False
            if resp.status != 200:
                raise PublishError(f"{url}{path}: HTTP {resp.status}: {body[:300]}")
            try:
                ok = msgspec.json.decode(body).get("success", True) if body.strip() else True
            except (msgspec.DecodeError, AttributeError):
                ok = True
            if not ok:
                raise PublishError(f"{url}{path}: success=false: {body[:300]}")
            return True


def make_publisher(cfg, base_model: str) -> DiskPublisher | DistributedPublisher | None:
    """The publisher a `publish` config section names (None for type = "none")."""
    match cfg:
        case DiskPublish():
            return DiskPublisher(cfg, base_model)
        case DistributedPublish():
            return DistributedPublisher(cfg)
    return None
