"""The server's side of `/update_weights_from_distributed` (docs/sglang.md §3.2-3.3): a gloo (or NCCL)
group that the trainer, rank 0, broadcasts parameters over.

Rendezvous, as SGLang's `init_custom_process_group` lays it out, so a trainer written for SGLang
joins unchanged: rank 0 hosts a `TCPStore` at master_address:master_port; the group's keys live
under `"{group_name}/"` and the backend's under `"{group_name}/{device}/"`. A trainer that does not
share SGLang's helper builds the same thing from public APIs:

    store = dist.TCPStore(addr, port, world_size, is_master=True)
    pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", dist.PrefixStore(f"{group_name}/", store)), 0, world_size)
    for t in tensors: pg.broadcast(t, 0).wait()      # same names and order as the HTTP request

The server joins as rank `rank_offset` (one rank per server: no tensor parallelism here).
"""

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["WeightGroup", "DTYPES"]

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
}


class WeightGroup:
    """A named process group this server belongs to, for receiving broadcast weights."""

    def __init__(self, *, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, backend: str = "gloo", timeout_s: float = 300.0,
                 device: torch.device | str = "cuda"):
        """`device`: the served model's GPU, where NCCL receives (ignored with gloo, which receives
        on the CPU)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():  # a trainer on NCCL would wait out its timeout
            raise ValueError("backend nccl needs a GPU and this server has none: publish with "
                             "publish.backend = 'gloo', or serve on a GPU")
        self.name = group_name
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device if backend == "nccl" else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        timeout = timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(master_address, int(master_port), world_size, is_master=False,
                                    timeout=timeout)
        prefix = dist.PrefixStore(f"{self.device.type}/", dist.PrefixStore(f"{group_name}/", self._store))
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size, options)

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                flattened: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Post one broadcast(src=0) per name, or one flat one for the bucket; return the tensors."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
        for d in dtypes:
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; expected one of {sorted(DTYPES)}")
        if flattened:
            if len(set(dtypes)) != 1:
                raise ValueError("flattened_bucket needs one dtype for the whole bucket")
            sizes = [int(torch.Size(s).numel()) for s in shapes]
            flat = torch.empty(sum(sizes), dtype=DTYPES[dtypes[0]], device=self.device)
            self.pg.broadcast(flat, 0).wait()
            parts = torch.split(flat, sizes)
            return [(n, p.view(s)) for n, p, s in zip(names, parts, shapes, strict=True)]
        out = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            tensor = torch.empty(shape, dtype=DTYPES[dtype], device=self.device)
            self.pg.broadcast(tensor, 0).wait()
            out.append((name, tensor))
        return out

    def close(self) -> None:
        self.pg = None
        self._store = None
