"""The machinery behind ``fastpeft.app.memory``: models on fake tensors, one traced training step.

A model is built on the meta device (no memory), its linear layers swapped for NF4 layers of the exact
shapes quantization produces, adapters injected, then every parameter and buffer is replaced by a fake
tensor (``FakeTensorMode``: shapes, dtypes and storages, no data). One training step then runs under
PyTorch's ``MemTracker``, which records every storage the step allocates and frees, by category
(parameters, buffers, gradients, optimizer state, activations — what the forward allocates —,
temporaries — what the backward allocates), and the peak.

Two fixes to ``MemTracker`` as torch 2.13 ships it, in a subclass: it registers gradient hooks on every
parameter and so fails on a frozen one (every PEFT model has them), and it updates per-module peaks on
every op (quadratic in the model size; only the global peak is needed here).

The fake tensors live on the CPU device, which stands for the GPU: fake CUDA tensors need a CUDA build
of torch. The ops are the GPU's (the same autograd graph; attention through SDPA with ``is_causal``, which
keeps the output and the log-sum-exp on both devices, see ``register_causal_sdpa``); what a fused kernel
allocates inside itself is not seen, so the caller adds the dequantize-once scratch analytically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from fastpeft.kernels.formats import NESTED_BLOCKSIZE

__all__ = [
    "CAUSAL_SDPA",
    "FakeHostOffload",
    "StepTracker",
    "fake_mode",
    "fakeify",
    "meta_nf4_linear",
    "nbytes",
    "register_causal_sdpa",
    "swap_linears",
]

CAUSAL_SDPA = "fastpeft_causal_sdpa"

_TOTAL = "Total"


class StepTracker(MemTracker):
    """``MemTracker`` that accepts frozen parameters and keeps only the global peak (see module doc)."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._on_grad),
                        p.register_post_accumulate_grad_hook(lambda q: self._on_grad(q.grad)),
                    )
        return sizes

    def _on_grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL]:
                self._peak_mem[dev] = snap[_TOTAL]
                self._peak_mem_snap[dev] = dict(snap)

    def peak(self) -> dict[str, int]:
        """Bytes at the peak by category (``Parameter``, ``Buffer``, ``Gradient``, ``Activation``,
        ``Temp``, ``Optstate``, ``Other``) and ``Total``, summed over devices."""
        return _by_name(self.get_tracker_snapshot("peak"))

    def current(self) -> dict[str, int]:
        """Bytes held now, by category (as ``peak``)."""
        return _by_name(self.get_tracker_snapshot("current"))


def _by_name(snapshot: dict[torch.device, dict[Any, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for snap in snapshot.values():
        for key, value in snap.items():
            name = key.value if isinstance(key, _MemRefType) else str(key)
            out[name] = out.get(name, 0) + int(value)
    return out


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode that accepts the (real, CPU) constants some library code creates."""
    return FakeTensorMode(allow_non_fake_inputs=True)


class FakeHostOffload:
    """Twin of ``torch.autograd.graph.save_on_cpu`` for fake tensors: a saved tensor leaves the device
    (its device storage is dropped, its bytes counted as host memory) and comes back as a fresh device
    allocation when the backward unpacks it, as the real host-to-device copy does."""

    def __init__(self) -> None:
        self.host_bytes = 0
        self.host_peak = 0

    def __call__(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> tuple:
        size = t.numel() * t.element_size()
        self.host_bytes += size
        self.host_peak = max(self.host_peak, self.host_bytes)
        return t.shape, t.dtype, t.device, size

    def _unpack(self, packed: tuple) -> torch.Tensor:
        shape, dtype, device, size = packed
        self.host_bytes -= size
        return torch.empty(shape, dtype=dtype, device=device)


def register_causal_sdpa() -> str:
    """Register (once) and name an attention implementation that is transformers' SDPA with ``is_causal``
    and no mask, as transformers runs an unpadded batch.

    Its check for "no padding" reads the mask's values, which fake tensors do not have, so on fake tensors
    transformers would build a ``[seq, seq]`` mask that a real unpadded step never allocates. Registered
    without a mask function, the implementation gets no mask.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if CAUSAL_SDPA not in AttentionInterface():
        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    return CAUSAL_SDPA


def meta_nf4_linear(linear: nn.Module, blocksize: int = 64, nested_quant_map: torch.Tensor | None = None) -> nn.Module:
    """A ``fastpeft.nn.NF4Linear`` on the meta device with the tensors ``quantize_nf4`` (double quantization)
    would produce for ``linear.weight`` ``[out, in]``: packed codes, uint8 absmax, nested absmax, offset, maps.

    ``nested_quant_map``: one 256-entry map shared by every layer, as quantization on the CPU leaves it
    (a cached tensor); on a GPU each layer gets its own copy (the default here)."""
    from fastpeft.nn import NF4Linear
    from fastpeft.quant import NF4Weight

    n, k = linear.weight.shape
    blocks = -(-n * k // blocksize)

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    w = NF4Weight(
        empty((n * k + 1) // 2, 1, dtype=torch.uint8), empty(blocks, dtype=torch.uint8), torch.Size((n, k)),
        linear.weight.dtype, blocksize, quant_map=empty(16), nested_absmax=empty(-(-blocks // NESTED_BLOCKSIZE)),
        offset=empty(), nested_quant_map=empty(256) if nested_quant_map is None else nested_quant_map,
    )  # fmt: skip
    bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
    return NF4Linear(w, bias)


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: Iterable[str]) -> list[str]:
    """Replace every ``nn.Linear`` not matched by ``skip`` with ``make(linear)``; returns the names swapped."""
    from fastpeft.peft.quantize import is_skipped

    skip = tuple(skip)
    names = [n for n, m in model.named_modules() if n and type(m) is nn.Linear and not is_skipped(n, skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return names


def fakeify(model: nn.Module, device: str = "cpu") -> None:
    """Replace every parameter and buffer of ``model`` by an empty fake tensor of the same shape, stride,
    dtype and ``requires_grad`` (call inside ``fake_mode()``); tied tensors stay tied."""
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in memo:
            new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return memo[id(t)]

    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = fake(p, True)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = fake(b, False)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (each counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(id(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def fake_bnb_linears(model: nn.Module, compute_dtype: torch.dtype) -> list[torch.Tensor]:
    """Give every bitsandbytes ``Linear4bit`` in ``model`` fake NF4 tensors (packed codes, uint8 absmax,
    nested absmax, offset, maps) in a ``QuantState``, as a 4-bit load leaves them (call inside
    ``fake_mode()``, after ``fakeify``). Returns every tensor of the 4-bit weights."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    tensors: list[torch.Tensor] = []
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        n, k = module.out_features, module.in_features
        blocks = -(-n * k // 64)
        packed = nn.Parameter(torch.empty((n * k + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
        nested = QuantState(absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE)), code=torch.empty(256), blocksize=256,
                            dtype=torch.float32)  # fmt: skip
        packed.quant_state = QuantState(
            absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size((n, k)), code=torch.empty(16),
            blocksize=64, quant_type="nf4", dtype=compute_dtype, offset=torch.empty(()), state2=nested,
        )  # fmt: skip
        packed.compress_statistics, packed.quant_type, packed.bnb_quantized = True, "nf4", True
        module._parameters["weight"] = packed
        state = packed.quant_state
        tensors += [packed, state.absmax, state.code, state.offset, nested.absmax, nested.code]
    return tensors


def largest_weight_bytes(layers: Iterable[tuple[int, int]], itemsize: int = 2) -> int:
    """Bytes of the largest ``[out, in]`` weight among ``layers`` in ``itemsize``-byte elements."""
    return max((math.prod(s) * itemsize for s in layers), default=0)
