"""Training past one GPU with PyTorch's own engines: DDP and FSDP2 over fastpeft models, under ``torchrun``.

``fastpeft finetune`` started by ``torchrun --nproc-per-node N`` joins the process group torchrun sets up
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment; NCCL on GPUs, gloo on the CPU) and trains
with one of two strategies:

- ``ddp``: ``DistributedDataParallel`` over the whole step (model and loss as one module, so its hooks see
  every micro-batch). Every rank holds the whole model; only the trainable (adapter) gradients are
  all-reduced. Buffers are synchronized once at start, never per forward: an NF4 base lives in buffers,
  and broadcasting it every step would move the whole quantized model.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer and on the root. Every
  ``nn.Parameter`` is sharded over the ranks (a dense base, the adapters, embeddings, head) and gathered
  layer by layer. NF4 packed weights are buffers and stay replicated: each rank keeps the whole
  quantized base (``nf4_replicated_bytes``: about 0.516 byte per weight with double quantization, e.g.
  3.6 GB = 3.35 GiB for Llama-3-8B's 6.98 B linear weights), while the 16-bit embeddings, head and all adapter state
  (weights, gradients, AdamW moments) are divided by the world size.

The batch: ``batch_size`` examples per rank and micro-batch, so an optimizer step sees
``batch_size x world_size x grad_accum`` examples. Every rank draws the same global batch (the data order
is seeded) and takes its own rows; the loss of each rank is weighted by its share of the global batch's
label tokens, so gradients, losses and updates equal a single process trained on the global batches.

Results and checkpoints are written once, by rank 0, atomically (``fastpeft.app.checkpoint``); under FSDP2
the trainable tensors and optimizer moments are gathered to full tensors first (only those: the base is
never gathered whole), and a resumed run shards them again. Every collective runs on every rank in the
same order; a decision one rank takes alone (stop on a signal, a failed write) is agreed on first.

Joining is bounded: a process that finds ``WORLD_SIZE`` > 1 but no peers (started without torchrun, a wrong
``RANK``, a ``WORLD_SIZE`` set by hand) stops after ``FASTPEFT_JOIN_TIMEOUT`` seconds (default 30) with one line
naming the variables, instead of waiting in the process group's set-up for ever.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft.app.data import IGNORE_INDEX

__all__ = [
    "STRATEGIES",
    "DistributedRun",
    "LossModule",
    "launched",
    "nf4_replicated_bytes",
    "setup",
    "shard_fsdp2",
]

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
JOIN_TIMEOUT = 30.0  # seconds a rank waits for the others to join (FASTPEFT_JOIN_TIMEOUT overrides it)


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def join_timeout() -> float:
    """Seconds to wait for every rank to join: ``FASTPEFT_JOIN_TIMEOUT``, else ``JOIN_TIMEOUT``."""
    value = os.environ.get("FASTPEFT_JOIN_TIMEOUT")
    if value is None:
        return JOIN_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e6:
        raise ValueError(f"environment variable FASTPEFT_JOIN_TIMEOUT={value!r} is not a number of seconds")
    return seconds


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


class LossModule(nn.Module):
    """A model and its loss as one module: ``forward(batch)`` returns ``loss_fn(model, batch)``.

    DDP and FSDP2 act in their module's forward hooks; the chunked loss (``fastpeft.app.savers``) calls the
    decoder and reads the head's weight directly, so the engine must wrap the whole step, not the model.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), in module order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def shard_fsdp2(root: nn.Module, model: nn.Module, mesh: Any = None) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every decoder block of ``model`` and then to ``root`` (which holds
    ``model``; the embeddings, final norm, head and prompt encoders go in the root's group).

    Returns:
        ``root``, now an ``FSDPModule``; its parameters are DTensors sharded on dim 0.

    Raises:
        ValueError: the model names no repeated block (``_no_split_modules``) to shard by.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _decoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"--distributed fsdp: {type(model).__name__} names no decoder block class (_no_split_modules) to shard by"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def nf4_replicated_bytes(model: nn.Module) -> int:
    """Bytes of NF4 state (packed codes, absmax, code maps) every rank keeps whole under FSDP2.

    NF4 weights are buffers, which ``fully_shard`` leaves replicated; this is the per-rank memory that
    sharding does not divide (the 16-bit parameters and the adapter state are divided by the world size).
    """
    from fastpeft.nn import NF4Linear

    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False) if b is not None)
    return total


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it), a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


class _LoadedState:
    """Stands in for the optimizer while ``Checkpoint.restore`` runs: keeps the state dict it loads, so the
    full tensors can be sharded before they reach the real optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.param_groups = optimizer.param_groups
        self.loaded: dict[str, Any] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict


class _FullState:
    """An optimizer's ``state_dict`` with every DTensor gathered, for ``save_checkpoint`` on rank 0."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, Any]:
        return self._state_dict


@dataclass
class DistributedRun:
    """One process of a multi-process run: who it is, where it computes, and how it trains.

    Attributes:
        rank, world_size, local_rank: from torchrun's environment.
        device: ``cuda:<local_rank>`` on GPUs, else the CPU.
        strategy: ``"ddp"`` or ``"fsdp"``.
        owns_group: ``setup`` created the process group (``close`` ends it; a caller's group stays).
        module: the wrapped loss module once ``wrap`` ran.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str
    owns_group: bool = False
    module: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- agreement ----------------------------------------------------------------------------

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a signal one rank received, a failure)."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_main(self, fn: Callable[[], Any], what: str) -> None:
        """Run ``fn`` on rank 0 only; every rank raises if it failed (rank 0 its own error, the others an
        ``OSError`` pointing at rank 0), so no rank waits on a collective the others never reach."""
        error: BaseException | None = None
        if self.is_main:
            try:
                fn()
            except Exception as e:  # re-raised below, after the others know
                error = e
        failed = self.any(error is not None)
        if error is not None:
            raise error
        if failed:
            raise OSError(f"rank 0 failed while writing {what} (its error is above)")

    # -- model --------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """Wrap ``model`` and its loss for this run's strategy (``self.module``); FSDP2 shards ``model``'s
        parameters in place, so collect parameters and build the optimizer after this."""
        root = LossModule(model, loss_fn)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # forward_sync_buffers=False: the NF4 buffers are synchronized once here, never per step.
            self.module = DistributedDataParallel(root, device_ids=ids, forward_sync_buffers=False)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            self.module = shard_fsdp2(root, model, mesh)
            replicated = nf4_replicated_bytes(model)
            if replicated and self.is_main:
                log.info("fsdp: NF4 weights stay replicated, %.1f MiB on every rank", replicated / 2**20)

    @contextlib.contextmanager
    def _sync(self, enabled: bool) -> Iterator[None]:
        """Gradient synchronization on (the last micro-batch of a step) or off (the ones before it)."""
        if self.strategy == "ddp":
            with contextlib.nullcontext() if enabled else self.module.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(enabled)
            yield

    def _rows(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """This rank's rows of a global batch (contiguous, as even as possible); ``(rows, real)``.

        A rank left without rows, or whose rows carry no label, still runs a forward and backward (the
        gradient collectives need every rank): on the batch's first row, labelled with its own ids so the
        loss is finite, weighted zero.
        """
        n = batch["input_ids"].shape[0]
        lo = n * self.rank // self.world_size
        hi = n * (self.rank + 1) // self.world_size
        rows = {k: v[lo:hi] for k, v in batch.items()}
        if hi > lo and bool((rows["labels"][:, 1:] != IGNORE_INDEX).any()):
            return rows, True
        first = {k: v[:1] for k, v in batch.items()}
        first["labels"] = first["input_ids"].masked_fill(first["attention_mask"] == 0, IGNORE_INDEX)
        return first, False

    def accumulate(
        self, micro: list[dict[str, torch.Tensor]], params: list[nn.Parameter], max_norm: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one optimizer step's global micro-batches, then gradient clipping.

        Rank r's loss on its rows is a mean over its ``n_r`` label tokens; weighted ``n_r / n`` (``n``: the
        step's label tokens over all ranks and micro-batches) and scaled by the world size, which the
        engines' gradient averaging divides out, the summed gradient is that of the global token mean.

        Returns:
            ``(loss, grad_norm)``: the step's global token-weighted mean loss and the total gradient norm
            before clipping, both float32 scalars on ``self.device``, equal on every rank.
        """
        import torch.distributed as dist

        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
        n_total = max(sum(counts), 1)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            rows, real = self._rows(batch)
            share = int((rows["labels"][:, 1:] != IGNORE_INDEX).sum()) / n_total if real else 0.0
            rows = {k: v.to(self.device, non_blocking=True) for k, v in rows.items()}
            with self._sync(i == len(micro) - 1):
                with autocast:
                    loss = self.module(rows)
                (loss * (share * self.world_size)).backward()
            loss_sum += loss.detach().float() * share
        dist.all_reduce(loss_sum)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return loss_sum, _full(norm).float().to(self.device)

    def loss_sums(self, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """The summed token losses and the label-token count of ``batches`` (global batches) over all ranks,
        without gradients: each rank runs its rows of every batch (FSDP2's gathers need every rank in each
        forward), weights its mean loss by its label tokens, and the sums are reduced like the train loss."""
        import torch.distributed as dist

        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in batches:
                rows, real = self._rows(batch)
                n = int((rows["labels"][:, 1:] != IGNORE_INDEX).sum()) if real else 0
                rows = {k: v.to(self.device, non_blocking=True) for k, v in rows.items()}
                with autocast:
                    loss = self.module(rows)
                if n:
                    sums[0] += loss.detach().double() * n
                    sums[1] += n
        dist.all_reduce(sums)
        total, count = sums.tolist()
        return total, int(count)

    # -- state --------------------------------------------------------------------------------

    def all_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether every trainable value is finite on every rank (each checks its shards)."""
        local = all(bool(torch.isfinite(p.to_local() if _is_dtensor(p) else p).all()) for p in params)
        return not self.any(not local)

    def _full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> _FullState:
        sd = optimizer.state_dict()
        state = {idx: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                 for idx, st in sd["state"].items()}  # fmt: skip
        return _FullState({"state": state, "param_groups": sd["param_groups"]})

    def save_checkpoint(
        self,
        directory: Path,
        named: list[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        **trainer_state: Any,
    ) -> None:
        """``fastpeft.app.checkpoint.save_checkpoint`` by rank 0 (after FSDP2's shards are gathered on all ranks)."""
        from fastpeft.app.checkpoint import save_checkpoint

        if self.strategy == "fsdp":
            named = [(n, _full(p)) for n, p in named]
            optimizer = self._full_optimizer_state(optimizer)
        self.on_main(
            lambda: save_checkpoint(directory, named, optimizer, scheduler, self.device, **trainer_state),
            f"the checkpoint {directory}",
        )

    def restore(
        self, state: Any, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None:
        """``Checkpoint.restore`` on every rank; under FSDP2 the full tensors are sharded into place."""
        if self.strategy != "fsdp":
            state.restore(named, optimizer, scheduler, self.device)
            return
        from torch.distributed.tensor import distribute_tensor

        full = [(n, torch.empty(p.shape, dtype=p.dtype)) for n, p in named]
        sink = _LoadedState(optimizer)
        state.restore(full, sink, scheduler, self.device)  # checks everything, fills `full` and `sink`

        def shard(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if not _is_dtensor(like) or value.shape != like.shape:
                return value
            # every rank holds the whole value: each keeps its own shard, nothing is sent
            value = value.to(device=like.device, dtype=like.dtype)
            return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)

        params = [p for _, p in named]
        with torch.no_grad():
            for (_, value), p in zip(full, params, strict=True):
                p.copy_(shard(value, p))
        loaded = sink.loaded
        loaded["state"] = {idx: {k: shard(v, params[idx]) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                           for idx, st in loaded["state"].items()}  # fmt: skip
        optimizer.load_state_dict(loaded)

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        """Inside: every trainable parameter of ``model`` holds its whole value (FSDP2's shards gathered on
        all ranks; nothing changes under DDP), so ``save_pretrained`` writes the adapter as usual."""
        if self.strategy != "fsdp":
            yield
            return
        swapped = []
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and _is_dtensor(p):
                    module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                    swapped.append((module, name, p))
        try:
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def close(self) -> None:
        """Release the engine, then end the process group if ``setup`` started it.

        DDP's reducer holds the group: it goes first, while the group still works (a gloo group torn down
        under a live reducer, or while the other rank still sends, can block in its destructor); the
        barrier lets every rank finish its last collective before any rank closes its connections.
        """
        import torch.distributed as dist

        self.module = None
        gc.collect()  # the engine's hooks and reducer may sit in reference cycles
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _torchrun_variables() -> str:
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return ", ".join(f"{n}={os.environ[n]}" if n in os.environ else f"{n} unset" for n in names)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null inside: c10d's C++ logging writes each failed connection attempt there
    (a screenful per retry), and the one line ``_join`` raises says what happened."""
    import sys

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _join(rank: int, world: int, use_cuda: bool, dev: torch.device) -> None:
    """Start the default process group once every rank has checked in, within ``join_timeout()`` seconds.

    The store torchrun's variables point at is reached (rank 0 hosts it unless torchrun's agent does) and every
    rank sets its key there and waits for the others' before the group is made, so a missing peer is an error
    after a bounded wait, not a hang in the backend's set-up.

    Raises:
        ValueError: a variable is missing or a peer did not join in time (the message names the variables).
    """
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    seconds = join_timeout()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    hint = (
        f"start every one of the {world} processes with torchrun --nproc-per-node {world}, or unset WORLD_SIZE "
        "to train in one process"
    )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"{_torchrun_variables()}: WORLD_SIZE > 1 needs {name}; {hint}")
    try:
        with _native_stderr_silenced():
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=seconds)))
            store.set_timeout(timedelta(seconds=seconds))
            store.set(f"fastpeft/joined/{restart}/{rank}", "1")
            store.wait([f"fastpeft/joined/{restart}/{r}" for r in range(world)])
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError: a timeout, a refused connection
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"{_torchrun_variables()}: the other processes did not join within {seconds:g} s "
            f"(FASTPEFT_JOIN_TIMEOUT sets the wait; {first}); {hint}"
        ) from None
    store.set_timeout(default_pg_timeout)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=dist.PrefixStore("default_pg", store),  # as init_process_group keys a store it makes itself
        rank=rank,
        world_size=world,
        device_id=dev if use_cuda else None,
    )


def setup(strategy: str | None, device: str | None) -> DistributedRun | None:
    """Join torchrun's process group when this process is one of several; None for a single process.

    Args:
        strategy: ``"ddp"`` (the default when launched) or ``"fsdp"``; given to a single process, it is
            noted and ignored (there is nothing to distribute).
        device: ``"cuda"`` / ``"cpu"`` / None (a GPU when there is one). Each rank takes ``cuda:<LOCAL_RANK>``.

    Raises:
        ValueError: an unknown strategy, an explicit GPU index under torchrun, no GPU for local rank,
            a ``RANK`` outside ``[0, WORLD_SIZE)``, peers that do not join within ``join_timeout()`` seconds,
            or torch without distributed support.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"--distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not launched():
        if strategy is not None:
            log.info("--distributed %s: a single process (start several with torchrun), training as usual", strategy)
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: multi-process training is not possible")
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"{_torchrun_variables()}: RANK must be in [0, WORLD_SIZE) and LOCAL_RANK at least 0")
    want = torch.device(device) if device is not None else None
    if want is not None and want.type == "cuda" and want.index is not None:
        raise ValueError(f"--device {device}: under torchrun each rank takes cuda:<LOCAL_RANK>; pass --device cuda")
    use_cuda = want.type == "cuda" if want is not None else torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        _join(rank, world, use_cuda, dev)
    return DistributedRun(rank, world, local, dev, strategy or "ddp", owns_group=owns)
