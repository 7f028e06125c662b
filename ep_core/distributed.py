"""Past one device: epx as one job of several processes under torch.distributed, the way torchrun starts it.

A launcher (torchrun; SLURM's srun or a Kubernetes job that exports the same variables) starts one process per
device with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. :func:`joined` makes them one job —
NCCL between GPUs, gloo between CPU processes, with a gloo group beside NCCL for the host's small messages — and
gives each process its :class:`World`: rank, size, and the device it computes on (``cuda:LOCAL_RANK``, or the
CPU). Without WORLD_SIZE > 1 the world is one process and nothing is initialised, so the same code serves both.

Only tensors and JSON text cross between processes, never pickles: records travel as UTF-8 bytes in uint8
tensors, gradients as one flat buffer per dtype on the compute device.

A collective on the gloo group that fails — another rank stopped, the network broke, or the wait passed
``timeout`` — raises a :class:`~ep_core.errors.DistributedError` that names the rank and what it was doing; gloo
notices a closed connection at once. Every exchange of records and host numbers goes through gloo. NCCL's
collectives (the gradient sum and the start's broadcast, on GPUs) are asynchronous: a lost peer shows at the next
synchronisation, and NCCL's watchdog ends the process after ``timeout`` with NCCL's own message. Either way no
job waits longer than the timeout.

Data parallelism rests on one identity. Split a global batch of B samples into W shards of b = B/W. The
model's cost C = (1/B)·Σᵢ ℓᵢ is then the sum of the shards' shares C_r = (b/B)·C(shard r). Each rank estimates
∇θC_r, and the sum over ranks (:func:`summed_gradient`) estimates ∇θC.

- An equilibrium model gets the share applied to its cost itself (:func:`cost_share`). Every sample is then
  nudged exactly as in the one-process run, by β·∇ℓᵢ/B. So the EP family's finite-β estimate equals the
  one-process estimate, not only its limit.
- A model without an equilibrium (feed-forward: bptt, dfa, fa) has estimates that are means of per-sample terms,
  so the share scales the estimate instead.

The identity assumes two things:

- every sample weighs the same in the model's cost. That is true of every built-in model but cet with
  overlapping patches (stride < patch), whose cost divides by the masked pixels of the whole batch, a number
  that varies from image to image;
- the samples of a batch do not interact in the estimate. That is true of the plain solver and of adjoint's
  Neumann series. Anderson mixes with weights computed over the whole batch, adjoint's GMRES takes inner
  products over it, and aep's ``clip`` compares norms over it, so with any of them the result agrees with one
  process only to the solver's tolerance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ep_core.errors import ConfigError, DistributedError, UsageError
from ep_core.protocols import Batch, DifferentiatesCost, EquilibriumModel

DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for the other ranks. A sweep's ranks meet after every round of grid points, so the
timeout must be longer than the slowest point."""

MAX_TIMEOUT = 1e7
"""About four months: far past any job, and within what the process group's timer can hold."""

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (rank 0 writes files and prints), ``local_rank`` on
    its node (its GPU), the collectives' ``timeout`` in seconds and the gloo group for host-side messages."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    host_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def place(self, device: str) -> str:
        """The device this rank computes on when ``device`` is requested: with several ranks, each its own GPU."""
        if self.size == 1:
            return device
        kind = torch.device(device).type if device.strip() else ""
        if kind == "cuda":
            if torch.device(device).index is not None:
                raise UsageError(f"--device {device}: under torchrun each rank takes its own GPU, cuda:LOCAL_RANK; "
                                 "give --device cuda")
            return f"cuda:{self.local_rank}"
        if kind != "cpu":
            raise UsageError(f"--device {device}: a job of several processes computes on cpu or cuda")
        return "cpu"

    def gather_json(self, value: Any, *, what: str) -> list[Any]:
        """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        data = json.dumps(value, allow_nan=False).encode()
        with self._collective(what):
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=self.host_group)
            longest = max(int(length) for length in lengths)
            mine = torch.zeros(longest, dtype=torch.uint8)
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(gathered, mine, group=self.host_group)
        return [json.loads(bytes(t[:int(n)].numpy())) for t, n in zip(gathered, lengths)]

    def sum_tensors(self, tensors: Sequence[torch.Tensor], *, what: str) -> list[torch.Tensor]:
        """The elementwise sums over ranks of ``tensors``: one all-reduce per dtype, on the tensors' device."""
        return self._flat(tensors, what=what, collective=lambda flat: dist.all_reduce(flat, dist.ReduceOp.SUM))

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], *, what: str) -> None:
        """Give every rank rank 0's values of ``tensors``, in place (parameters, buffers, estimator state)."""
        results = self._flat(tensors, what=what, collective=lambda flat: dist.broadcast(flat, src=0))
        with torch.no_grad():
            for tensor, result in zip(tensors, results):
                tensor.copy_(result)

    def _flat(self, tensors: Sequence[torch.Tensor], *, what: str, collective: Any) -> list[torch.Tensor]:
        if self.size == 1:
            return list(tensors)
        results: list[torch.Tensor | None] = [None] * len(tensors)
        by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_kind.setdefault((tensor.dtype, tensor.device), []).append(index)
        for indices in by_kind.values():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            with self._collective(what):
                collective(flat)
            for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                results[i] = piece.view_as(tensors[i])
        return results  # type: ignore[return-value]

    def sum_numbers(self, values: Sequence[float], *, what: str) -> list[float]:
        """Host numbers summed over ranks."""
        return self._numbers(values, dist.ReduceOp.SUM, what)

    def mean_numbers(self, values: Sequence[float], *, what: str) -> list[float]:
        """Host numbers averaged over ranks: the global batch's mean of shard means (equal shards)."""
        return [total / self.size for total in self.sum_numbers(values, what=what)]

    def max_numbers(self, values: Sequence[float], *, what: str) -> list[float]:
        """Host numbers, the largest over ranks."""
        return self._numbers(values, dist.ReduceOp.MAX, what)

    def _numbers(self, values: Sequence[float], op: Any, what: str) -> list[float]:
        if self.size == 1 or not values:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        with self._collective(what):
            dist.all_reduce(tensor, op, group=self.host_group)
        return tensor.tolist()

    def barrier(self, *, what: str) -> None:
        if self.size > 1:
            with self._collective(what):
                dist.barrier(group=self.host_group)

    @contextmanager
    def main_first(self, *, what: str) -> Iterator[None]:
        """Rank 0 runs the block before the others, which then find its result in place (a download)."""
        if not self.main:
            self.barrier(what=what)
        yield
        if self.main:
            self.barrier(what=what)

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # torch.distributed's DistError family and gloo's failures are RuntimeErrors
            reason = " ".join(str(exc).split())[:300]
            raise DistributedError(
                f"rank {self.rank} of {self.size}: {what} failed: another rank has stopped (its own error, or the "
                f"launcher's report of how it ended, says why) or did not answer within {self.timeout:g} s "
                f"(--dist-timeout) ({reason})") from None


ONE_PROCESS = World()
"""The world of a process that runs alone: every collective is the identity."""


def _world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={text!r} is not a number of processes") from None


@contextmanager
def joined(device: str = "cpu", *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[World]:
    """This process's :class:`World` for the block: one process unless a launcher started several, then the
    job's process group (NCCL when ``device`` is cuda, gloo otherwise), destroyed on exit."""
    if not 0 < timeout < MAX_TIMEOUT:
        raise ConfigError("dist-timeout", f"must be a number of seconds between 0 and {MAX_TIMEOUT:g}, got "
                                          f"{timeout!r}")
    size = _world_size()
    if size <= 1:
        yield World(timeout=timeout)
        return
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the processes with torchrun "
                         "(or a launcher that sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT too)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise UsageError(f"rank {rank}: LOCAL_RANK={local_rank} but this node has {count} GPU(s); start at "
                             f"most {count} process(es) per node (torchrun --nproc-per-node {max(count, 1)})")
        torch.cuda.set_device(local_rank)
    wait = timedelta(seconds=timeout)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=wait)
        host_group = dist.new_group(backend="gloo", timeout=wait) if cuda else dist.group.WORLD
    except (RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DistributedError(f"rank {rank}: could not join the job of {size} processes at {where} "
                               f"({reason})") from None
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, timeout=timeout, host_group=host_group)
    except BaseException:
        # After a failed NCCL collective, tearing the group down can wait on the lost peer; the process is ending.
        if not cuda:
            dist.destroy_process_group()
        raise
    dist.destroy_process_group()


def shard(batch: Batch, world: World) -> Batch:
    """This rank's rows of a global batch: the rank-th of ``world.size`` equal slices of every tensor's first
    dimension (the samples)."""
    if world.size == 1:
        return batch
    sizes = {tensor.shape[0] if tensor.dim() else None for tensor in batch.values()}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError("batch", f"cannot split a batch whose tensors do not share a first (sample) dimension: "
                                   f"{ {name: tuple(t.shape) for name, t in batch.items()} }")
    (total,) = sizes
    if total % world.size:
        raise ConfigError("batch_size", f"a global batch of {total} does not split into {world.size} equal shards; "
                                        f"use a --batch-size divisible by {world.size}")
    size = total // world.size
    return {name: tensor[world.rank * size:(world.rank + 1) * size] for name, tensor in batch.items()}


_SHARED_CLASSES: dict[type, type] = {}


@contextmanager
def cost_share(model: Any, share: float) -> Iterator[None]:
    """Within the block, an equilibrium model's cost is ``share`` times its own C; any other model is left as it is
    (module docstring). The model stays the same object, with the same parameters, buffers and identity. Only its
    class is swapped for a subclass that scales ``cost`` (and ``cost_gradient``, where the model computes it:
    :class:`~ep_core.protocols.DifferentiatesCost`), the way torch.nn.utils.parametrize swaps a module's
    class, and it is restored on exit."""
    if share == 1.0 or not isinstance(model, EquilibriumModel):
        yield
        return
    original = type(model)
    if original not in _SHARED_CLASSES:
        def cost(self: Any, state: Any, batch: Batch) -> torch.Tensor:
            return self.epx_cost_share * original.cost(self, state, batch)

        members: dict[str, Any] = {"cost": cost, "__module__": original.__module__}
        if issubclass(original, DifferentiatesCost):
            def cost_gradient(self: Any, state: Any, batch: Batch) -> tuple[torch.Tensor, ...]:
                return tuple(self.epx_cost_share * g for g in original.cost_gradient(self, state, batch))
            members["cost_gradient"] = cost_gradient
        _SHARED_CLASSES[original] = type(original.__name__, (original,), members)
    model.epx_cost_share = share
    model.__class__ = _SHARED_CLASSES[original]
    try:
        yield
    finally:
        model.__class__ = original
        del model.epx_cost_share


def shard_share(world: World) -> float:
    """b/B: the weight of one shard's mean in the global batch's mean."""
    return 1.0 / world.size


def summed_gradient(world: World, model: Any, grads: Mapping[str, torch.Tensor], *,
                    what: str) -> dict[str, torch.Tensor]:
    """The estimate of ∇θC for the global batch from each rank's ``grads`` on its shard: the sum over ranks of the
    shares' gradients (module docstring). ``grads`` of an equilibrium model are already of its share (estimated
    under :func:`cost_share`); any other model's are of its shard's mean and are weighted here."""
    if world.size == 1:
        return dict(grads)
    names = list(grads)
    weight = 1.0 if isinstance(model, EquilibriumModel) else shard_share(world)
    summed = world.sum_tensors([grads[name] * weight for name in names], what=what)
    return dict(zip(names, summed))
