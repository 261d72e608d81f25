"""Data parallelism over processes for the heavy stages (issue 11 item 3; docs/distributed.md).

``fetch-teacher`` (when it trains), ``synth-fae`` and ``distill`` run as N processes ("ranks") under
``torch.distributed``: gloo on the CPU, NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``). The ranks are
started either by ``torchrun`` (multi-node: the user runs it on every node) or by the stage itself
(``runtime.nproc`` > 1 and no launcher around it: :func:`launch`, torch's elastic launcher, what
``torchrun --standalone`` does). A process knows it is a rank from the launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``).

The global batch and every parameter keep their one-process meaning (the method's equations, §2.1
§2.3 §2.6 of the method reference, are over the global batch):

* every rank draws the same random numbers as one process would, for the whole global batch, from
  the same seeded generators, and takes its rows (:class:`Shard`: the first ``B mod N`` ranks get one
  row more); per-sample work (the generator's images, IB fits, UTAEs, PGD examples, student and
  teacher passes) then runs on those rows only;
* batch-coupled terms are computed on the global batch: BatchNorm in training mode
  (:func:`convert_batchnorm`: torch's ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d`, a
  differentiable all-reduce of per-rank sums, where SyncBatchNorm does not run: CPU / gloo), and the
  synthesiser's L_bn, IKL and the IB rule's batch-wide maximum (``ferd.fae``);
* a loss is split into per-rank *shares* that sum to the one-process loss (per-sample sums divided
  by the global batch size; a global term divided by N); gradients are summed over the ranks
  (:func:`all_reduce_grads_`) or averaged by DDP (:func:`data_parallel`) with the local loss scaled
  so that the average is the global mean; gradients through global statistics are exact because
  the backward of the differentiable all-reduce is again an all-reduce (:func:`all_reduce_sum_grad`);
* decisions are made once: the kept step from the all-reduced loss terms (identical on every rank),
  the labels and the class proportions p broadcast from rank 0 (:func:`broadcast_from_main`).

Results therefore equal one process's up to float reduction order.
Only rank 0 writes artifacts and run state; a failing rank records its one-line error
(:func:`record_failure`) and the launching process reports it (:func:`launch`).

Every function here is a no-op (or the identity) in a single process, so the one-process code paths
and their results are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ferd.errors import ConfigError, FerdError

__all__ = [
    "ENV_LAUNCHED",
    "GlobalBatchNorm2d",
    "Shard",
    "active",
    "all_gather_rows",
    "all_gather_stack",
    "all_reduce_",
    "all_reduce_grads_",
    "all_reduce_sum_grad",
    "barrier",
    "broadcast_from_main",
    "broadcast_module_",
    "convert_batchnorm",
    "data_parallel",
    "init_process_group",
    "is_main",
    "launch",
    "launched_by_ferd",
    "local_world_size",
    "rank",
    "record_failure",
    "revert_batchnorm",
    "shard",
    "shutdown",
    "threads_per_rank",
    "under_launcher",
    "world_size",
]

#: Set to "1" in the workers that :func:`launch` starts: they leave the error line to the launcher.
ENV_LAUNCHED = "FERD_LAUNCHED"


# --------------------------------------------------------------------------------------------
# who am I


def under_launcher() -> bool:
    """Whether this process was started by torchrun / torch's elastic launcher (``RANK`` and
    ``WORLD_SIZE`` set): it is then one rank and must not launch again."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_ferd() -> bool:
    """Whether this rank was started by :func:`launch` (rather than by a user's torchrun)."""
    return os.environ.get(ENV_LAUNCHED) == "1"


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the process group (1 without one)."""
    return dist.get_world_size() if _group() else 1


def rank() -> int:
    """This process's rank (the launcher's ``RANK`` before the group is joined; 0 without a launcher)."""
    return dist.get_rank() if _group() else int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine (the launcher's ``LOCAL_WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_launcher() else 1


def active() -> bool:
    """Whether a process group of more than one rank is running (the distributed code paths)."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the one that prints, writes artifacts and run state."""
    return rank() == 0


def threads_per_rank(threads: int, local_ranks: int) -> int:
    """CPU threads of each of ``local_ranks`` ranks on one machine: ``runtime.threads`` (0 = all cores)
    split evenly, at least 1. One rank keeps ``threads`` as it is (0 = torch's default)."""
    if local_ranks <= 1:
        return threads
    total = threads if threads > 0 else (os.cpu_count() or 1)
    return max(1, total // local_ranks)


def init_process_group(device: torch.device) -> torch.device:
    """Join the launcher's process group (``env://``): NCCL when ``device`` is CUDA (this rank then
    computes on ``cuda:LOCAL_RANK``), gloo otherwise. Returns this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if device.index is not None and world > 1 and local_world_size() > 1:
            raise ConfigError(f"runtime.device is {device} but {local_world_size()} ranks share this machine; "
                              "set runtime.device: cuda (or auto): rank r computes on cuda:LOCAL_RANK")
        if device.index is None or local_world_size() > 1:
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ConfigError(f"{local_world_size()} ranks on this machine but it has {count} CUDA device(s); "
                                  f"use at most {count} processes per node (runtime.nproc / --nproc-per-node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ConfigError(f"runtime.device is {device}: several processes run on the CPU (gloo) or on CUDA GPUs "
                          "(NCCL) only; set runtime.nproc: 1 or another device")
    return device


def shutdown() -> None:
    """Leave the process group (nothing without one)."""
    if _group():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# this rank's rows of the global batch


@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of a global batch of ``total`` rows; ``sizes``: every rank's row count."""

    start: int
    stop: int
    total: int
    sizes: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.stop - self.start

    def rows(self, t: Tensor | None) -> Tensor | None:
        """This rank's rows of ``t`` (``None`` stays ``None``)."""
        return None if t is None else t[self.start:self.stop]


def shard(total: int, what: str = "the batch size", *, allow_empty: bool = False) -> Shard:
    """This rank's share of ``total`` rows: the first ``total mod N`` ranks get one row more.

    ``what`` names the parameter for the error raised when ``total`` < N (a rank without rows) unless
    ``allow_empty`` (the last, partial batch of an epoch).
    """
    w, r = world_size(), rank()
    if total < w and not allow_empty:
        raise ConfigError(f"{what} is {total} but {w} processes share it (one row each at least); "
                          f"raise {what} or run fewer processes (runtime.nproc / --nproc-per-node)")
    base, extra = divmod(total, w)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(w))
    start = sum(sizes[:r])
    return Shard(start, start + sizes[r], total, sizes)


# --------------------------------------------------------------------------------------------
# collectives (identity in one process); NCCL needs the tensors on this rank's GPU


def _comm_device(t: Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """Reduce ``t`` over the ranks in place (``sum``, ``max`` or ``min``); returns ``t``."""
    if not active():
        return t
    where = _comm_device(t)
    buf = t if t.device == where else t.to(where)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    if buf is not t:
        t.copy_(buf)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, differentiable: the gradient of Σ_r f_r(S) with respect to rank r's input is the
    all-reduced sum of the upstream gradients (the backward is again an all-reduce)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum_grad(t: Tensor) -> Tensor:
    """Σ of ``t`` over the ranks, with gradients (identity in one process).

    Each rank gets the same sum S; if each rank's loss share is a function of S (and of its own rows)
    and the shares add up to the global loss, every rank's gradients are those of the global loss.
    """
    return _AllReduceSum.apply(t) if active() else t


def all_gather_rows(t: Tensor, sh: Shard) -> Tensor:
    """The global batch from every rank's rows (``sh.sizes``), in rank order, on every rank."""
    if not active():
        return t
    where = _comm_device(t)
    most = max(sh.sizes)
    buf = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=where)
    buf[:t.shape[0]] = t.to(where)
    parts = [torch.empty_like(buf) for _ in sh.sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:k] for p, k in zip(parts, sh.sizes, strict=True)]).to(t.device)


def all_gather_stack(t: Tensor) -> Tensor:
    """``[N, *t.shape]``: every rank's ``t`` (same shape on every rank), in rank order; ``t[None]`` in one process."""
    w = world_size()
    return all_gather_rows(t[None], Shard(0, 1, w, (1,) * w)) if w > 1 else t[None]


def broadcast_from_main(t: Tensor | None) -> Tensor | None:
    """Rank 0's ``t`` on every rank (a new tensor on ``t``'s device; ``t`` itself in one process)."""
    if t is None or not active():
        return t
    where = _comm_device(t)
    buf = t.detach().to(where).clone().contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)


def broadcast_module_(module: nn.Module) -> nn.Module:
    """Copy rank 0's parameters and buffers into ``module`` on every rank; returns it."""
    if active():
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.copy_(broadcast_from_main(t))
    return module


def all_reduce_grads_(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks (one flat all-reduce; a missing grad counts as 0)."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# --------------------------------------------------------------------------------------------
# global BatchNorm and DDP


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch over all ranks.

    Each rank sums its rows (shifted by the running mean, which every rank holds alike, against
    cancellation), one differentiable all-reduce gives the global mean and biased variance; the
    running statistics are updated with the unbiased variance, as ``BatchNorm2d`` does. Used where
    torch's ``SyncBatchNorm`` refuses to run (CPU tensors, gloo); in eval mode, or in one process, it
    is ``BatchNorm2d``. Same parameters, buffers and state-dict keys.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        shift = self.running_mean.detach() if self.running_mean is not None else x.new_zeros(c)
        xs = x - shift[None, :, None, None]
        count = x.new_full((1,), x.numel() // max(c, 1))
        stats = all_reduce_sum_grad(torch.cat([xs.sum(dim=(0, 2, 3)), (xs * xs).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean_s = stats[:c] / n
        var = (stats[c:2 * c] / n - mean_s * mean_s).clamp_min(0.0)
        mean = shift + mean_s
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return y


def _swap_batchnorm(module: nn.Module, make: Any, kinds: tuple[type, ...]) -> nn.Module:
    for name, child in module.named_children():
        if type(child) in kinds:
            new = make(child)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_batchnorm(child, make, kinds)
    return module


def convert_batchnorm(module: nn.Module, device: Any) -> nn.Module:
    """Make every ``BatchNorm2d`` of ``module`` global over the ranks (in place; parameters and
    buffers are kept, so optimisers and state dicts are unaffected): torch's ``SyncBatchNorm`` on
    CUDA, :class:`GlobalBatchNorm2d` elsewhere. Nothing changes in one process."""
    if not active():
        return module
    if torch.device(device).type == "cuda":
        cls: type = nn.SyncBatchNorm
    else:
        cls = GlobalBatchNorm2d
    return _swap_batchnorm(
        module, lambda bn: cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                               device=bn.weight.device if bn.weight is not None else None), (nn.BatchNorm2d,))


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_batchnorm` (plain ``BatchNorm2d`` again, same parameters and buffers)."""
    return _swap_batchnorm(
        module, lambda bn: nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats),
        (GlobalBatchNorm2d, nn.SyncBatchNorm))


def data_parallel(model: nn.Module, device: Any) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the ranks during the
    backward); ``model`` itself in one process. Buffers are not re-broadcast at each forward: the
    global BatchNorm (:func:`convert_batchnorm`) keeps them equal on every rank."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


# --------------------------------------------------------------------------------------------
# launching N ranks on this machine, and reporting a failed rank in one line


def record_failure(message: str, kind: str) -> None:
    """Leave this rank's one-line error for the launcher (``kind``: ``error``, a ``FerdError``; or
    ``peer``, a lost connection to another rank) in torch elastic's error file, where
    :func:`launch` and torchrun's failure report find it. Nothing without a launcher."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # torchrun's failure report prints py_callstack as the rank's "traceback": the line says it all
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}},
              "ferd": {"kind": kind, "line": message}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record))


def _describe(failures: Mapping[int, Any], nproc: int) -> str:
    """One line for the first root cause among the failed ranks: a rank's own error, a rank killed by
    a signal other than the launcher's SIGTERM, a crash (its traceback is above), a lost peer."""

    def ferd(f: Any) -> dict:
        data = getattr(f, "error_file_data", None) or {}
        return data.get("ferd") or {} if isinstance(data, dict) else {}

    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        r, f = item
        kind = ferd(f).get("kind")
        if kind == "error":
            klass = 0
        elif f.exitcode < 0 and f.exitcode != -signal.SIGTERM:
            klass = 1
        elif f.exitcode > 0 and kind is None:
            klass = 2
        elif kind == "peer":
            klass = 3
        else:
            klass = 4
        return klass, int(f.timestamp), r

    r, f = min(failures.items(), key=order)
    who = f"rank {r} of {nproc}"
    info = ferd(f)
    if info.get("kind") == "error":
        return f"{who}: {info.get('line', '')}"
    if info.get("kind") == "peer":
        return f"{who} lost contact with another rank ({info.get('line', '')}); nothing was written"
    if f.exitcode < 0:
        try:
            name = signal.Signals(-f.exitcode).name
        except ValueError:
            name = f"signal {-f.exitcode}"
        hint = " (from outside, or by the kernel when out of memory)" if f.exitcode == -signal.SIGKILL else ""
        return (f"{who} was killed by {name}{hint}; the other ranks were stopped and nothing was written; "
                "run the stage again to continue from its last run state")
    return f"{who} crashed with exit code {f.exitcode} (its traceback is above); nothing was written"


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """Silence the elastic agent's log lines (its per-rank failure report is replaced by one line)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(("torch.distributed", "torch._C"))]
    names += ["torch.distributed.elastic", "torch.distributed.launcher.api"]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(command: list[str], nproc: int, threads: int) -> None:
    """Run ``command`` (a program and its arguments) as ``nproc`` ranks on this machine through
    torch's elastic launcher, as ``torchrun --standalone --nproc-per-node nproc`` would: a c10d
    rendezvous on a free local port, no restarts. Each rank gets ``threads_per_rank(threads, nproc)``
    CPU threads (``OMP_NUM_THREADS``) and ``FERD_LAUNCHED=1``. Returns when every rank has exited 0;
    raises ``FerdError`` with one line naming the failed rank and why otherwise (the other ranks are
    stopped by the launcher). Ctrl-C stops the ranks and raises ``FerdError`` too.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = {ENV_LAUNCHED: "1", "OMP_NUM_THREADS": str(max(1, threads_per_rank(threads, nproc)))}
    with tempfile.TemporaryDirectory(prefix="ferd-launch-") as logs, _quiet_launcher(), _environment(env):
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, command[0])(*command[1:])
        except ChildFailedError as exc:
            raise FerdError(_describe(exc.failures, nproc)) from None
        except SignalException as exc:
            raise FerdError(f"interrupted ({exc.sigval.name}): the {nproc} ranks were stopped and nothing was written; "
                            "run the stage again to continue from its last run state") from None
