"""``NF4Linear``: a frozen NF4 (4-bit) linear layer, a drop-in for ``nn.Linear`` and bitsandbytes' ``Linear4bit``.

The quantized tensors are buffers, so ``.to()`` / ``.cuda()`` move them; the state dict is exactly the
transformers / bitsandbytes format (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``, plus
``bias``), so checkpoints load in either direction.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.kernels.formats import NF4Args
from fastpeft.nn.checks import MoveChecks, check_input
from fastpeft.ops.lora import nf4_linear
from fastpeft.quant import NF4Weight, quantize_nf4

__all__ = ["NF4Linear"]

# NF4Weight's tensor fields, each held as a (non-persistent) buffer of the same name.
_TENSOR_FIELDS = ("packed", "absmax", "quant_map", "nested_absmax", "offset", "nested_quant_map")


class NF4Linear(MoveChecks, nn.Module):
    """``y = x·dequant(W)ᵀ + bias`` with a frozen NF4 weight ``W [out_features, in_features]``.

    Gradients flow to ``x`` (and to ``bias`` if the caller makes it trainable), never to ``W``; the
    backward dequantizes ``W`` again rather than keeping a dense copy alive.

    Args:
        weight_nf4: the quantized ``[out, in]`` weight.
        bias: ``[out]`` or None; stored as a frozen ``nn.Parameter``.
        compute_dtype: dtype of the matmul; None computes in the input's dtype. With a compute dtype the
            input is cast to it and the output back to the input's dtype (bitsandbytes' rule). Under
            ``torch.autocast`` the autocast dtype wins, as for ``nn.Linear``.
    """

    def __init__(
        self, weight_nf4: NF4Weight, bias: torch.Tensor | None = None, *, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if len(weight_nf4.shape) != 2 or min(weight_nf4.shape) < 1:
            raise ValueError(f"weight_nf4 must be a non-empty 2-D [out, in] weight, got {tuple(weight_nf4.shape)}")
        self.out_features, self.in_features = (int(d) for d in weight_nf4.shape)
        self.compute_dtype = compute_dtype
        self._set_weight(weight_nf4)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- the quantized weight --------------------------------------------------------------------

    def _set_weight(self, w: NF4Weight) -> None:
        for name in _TENSOR_FIELDS:
            self.register_buffer(name, getattr(w, name), persistent=False)
        self._weight_dtype = w.dtype
        self.blocksize = w.blocksize
        self.nested_blocksize = w.nested_blocksize

    @property
    def weight_nf4(self) -> NF4Weight:
        """The quantized weight (shares this module's buffers)."""
        return NF4Weight(
            self.packed, self.absmax, torch.Size((self.out_features, self.in_features)), self._weight_dtype,
            self.blocksize, quant_map=self.quant_map, nested_absmax=self.nested_absmax, offset=self.offset,
            nested_quant_map=self.nested_quant_map, nested_blocksize=self.nested_blocksize,
        )  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes ``[(out * in + 1) // 2, 1]`` uint8, as bitsandbytes' ``Linear4bit.weight`` (read-only)."""
        return self.packed

    def kernel_args(self) -> NF4Args:
        """The weight as the fused kernels take it (built from the buffers; cheap, traceable)."""
        return NF4Args(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                       self.nested_absmax, self.offset, self.quant_map, self.nested_quant_map,
                       self.nested_blocksize)  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in ``dtype`` (default: the original weight's dtype).

        float64 is an exact cast of the float32 values (the format dequantizes in float32).
        """
        if dtype == torch.float64:
            return self.weight_nf4.dequantize(torch.float32).double()
        return self.weight_nf4.dequantize(dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(dtype) / .half() would cast the float32 absmax and code maps and break the format:
        # the quantized buffers follow device moves only, the bias follows everything.
        # Every quantized buffer is moved before anything is replaced, so a failed move (no such
        # device, out of memory halfway) raises with the layer exactly as it was.
        saved = {name: self._buffers[name] for name in _TENSOR_FIELDS}
        moved = {name: _follow_device(fn, t) for name, t in saved.items()}
        for name in _TENSOR_FIELDS:
            del self._buffers[name]
        try:
            super()._apply(fn, recurse)  # the bias: a single tensor, replaced only once it has moved
        except BaseException:
            self._buffers.update(saved)
            raise
        self._buffers.update(moved)
        return self

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize ``linear.weight`` to NF4 (bitsandbytes-identical bytes); the bias is copied as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(w, linear.bias.detach() if linear.bias is not None else None, compute_dtype=compute_dtype)

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module) -> NF4Linear:
        """Wrap a quantized bitsandbytes ``Linear4bit`` (``quant_type="nf4"``), reusing its packed bytes
        and quant state as they are (no dequantize / requantize round trip)."""
        weight = getattr(linear4bit, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(
                "linear4bit has no quant_state: it is not quantized yet (bitsandbytes quantizes on .to(device))"
            )
        if state.quant_type != "nf4":
            raise ValueError(f"only quant_type 'nf4' is supported, got {state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            # on CPUs with AVX512-BF16 bitsandbytes repacks a layer into a private layout on its first
            # inference forward; its own state_dict() converts it back to the standard layout in place
            linear4bit.state_dict()
            weight, state = linear4bit.weight, linear4bit.weight.quant_state
        packed = weight.data
        if packed.dtype != torch.uint8:  # bitsandbytes may store the same bytes under another dtype
            packed = packed.contiguous().view(-1).view(torch.uint8)
        fields: dict = dict(blocksize=int(state.blocksize), quant_map=state.code.float())
        if state.nested:
            offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(state.offset)
            fields.update(
                nested_absmax=state.state2.absmax,
                offset=offset.to(packed.device, torch.float32).reshape(()),
                nested_quant_map=state.state2.code.float(),
                nested_blocksize=int(state.state2.blocksize),
            )
        w = NF4Weight(packed.reshape(-1, 1), state.absmax, torch.Size(state.shape), state.dtype, **fields)
        bias = linear4bit.bias.detach() if getattr(linear4bit, "bias", None) is not None else None
        return cls(w, bias, compute_dtype=getattr(linear4bit, "compute_dtype", None))

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]``.

        Raises:
            TypeError: ``x`` is not a floating tensor (``nn.Linear`` refuses integers too).
            ValueError: ``x`` is not ``[..., in_features]`` (a 0-d tensor, another width).
        """
        check_input(x, self.in_features)
        if torch.is_autocast_enabled(x.device.type):
            dtype, out_dtype = torch.get_autocast_dtype(x.device.type), None
        elif self.compute_dtype is not None:
            dtype, out_dtype = self.compute_dtype, x.dtype
        else:
            dtype, out_dtype = x.dtype, None
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = nf4_linear(x.to(dtype), bias, self.kernel_args())
        return y if out_dtype is None else y.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.absmax.dtype == torch.uint8}"
        )

    # -- state dict in the bitsandbytes format --------------------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        sd = self.weight_nf4.to_bnb_state_dict(prefix)
        weight_key = f"{prefix}weight"
        # bitsandbytes' key order: the packed weight, the bias, then the quant state.
        destination[weight_key] = sd.pop(weight_key)
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(sd)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        used: set[str] = set()
        weight_key = f"{prefix}weight"
        if weight_key in state_dict:
            used |= {k for k in state_dict if k == weight_key or k.startswith(weight_key + ".")}
            try:
                w = NF4Weight.from_bnb_state_dict(state_dict, prefix)
            except ValueError as e:
                error_msgs.append(str(e))
            else:
                if tuple(w.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"size mismatch for {weight_key}: the checkpoint holds {tuple(w.shape)}, "
                        f"this layer is {(self.out_features, self.in_features)}"
                    )
                else:
                    self._set_weight(w.to(self.packed.device))
        else:
            missing_keys.append(weight_key)
        bias_key = f"{prefix}bias"
        if self.bias is not None:
            if bias_key in state_dict:
                used.add(bias_key)
                src = state_dict[bias_key]
                if src.shape != self.bias.shape:
                    error_msgs.append(
                        f"size mismatch for {bias_key}: the checkpoint holds {tuple(src.shape)}, "
                        f"this layer is {tuple(self.bias.shape)}"
                    )
                else:
                    with torch.no_grad():
                        self.bias.copy_(src)
            else:
                missing_keys.append(bias_key)
        if strict:
            # No child modules: every other key under this prefix is foreign.
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in used)


def _follow_device(fn, t: torch.Tensor | None) -> torch.Tensor | None:  # noqa: ANN001 - nn.Module's apply fn
    """``fn(t)`` when it keeps ``t``'s dtype, else ``t`` moved to where ``fn`` sends it (device only)."""
    if t is None:
        return None
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(moved.device)
