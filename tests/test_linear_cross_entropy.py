"""Chunked linear + cross-entropy against the unchunked loss: value and gradients, dense and NF4 heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, assert_close, assert_oracle, stable_seed

from fastpeft import quantize_nf4
from fastpeft.ops.linear_cross_entropy import linear_cross_entropy, vocab_slices

IGNORE = -100
# (tokens, hidden, vocab): one token, primes, a hidden width that is not a multiple of 64
SHAPES = [(1, 32, 7), (17, 96, 1031), (37, 48, 509)]


def _data(t: int, h: int, v: int, dtype: torch.dtype, key: tuple) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(stable_seed(*key))
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.2).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) < 0.3] = IGNORE  # some tokens carry no loss
    return hidden, weight, bias, labels


def _eager(hidden, weight, bias, labels, dtype):  # noqa: ANN001, ANN202
    """The unchunked loss and its gradients, computed in ``dtype`` from copies of the inputs."""
    h, w, b = (x.detach().to(dtype).requires_grad_() for x in (hidden, weight, bias))
    loss = F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=IGNORE)
    loss.backward()
    return loss, h.grad, w.grad, b.grad


def _chunked(hidden, weight, bias, labels, chunk_bytes):  # noqa: ANN001, ANN202
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    loss = linear_cross_entropy(h, w, labels, bias=b, ignore_index=IGNORE, chunk_bytes=chunk_bytes)
    loss.backward()
    return loss, h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["reference", "triton"] if INTERPRET else ["reference"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_dense_head_float32_equals_unchunked(shape: tuple[int, int, int], chunk_tokens: int, backend: str,
                                             monkeypatch) -> None:  # noqa: ANN001  # fmt: skip
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    t, h, v = shape
    inputs = _data(t, h, v, torch.float32, ("dense32", shape, chunk_tokens))
    got = _chunked(*inputs, chunk_bytes=4 * v * chunk_tokens)
    exact = _eager(*inputs, torch.float64)
    eager = _eager(*inputs, torch.float32)
    for name, a, x, e in zip(("loss", "dhidden", "dweight", "dbias"), got, exact, eager, strict=True):
        assert_oracle(a, x, e, msg=f"{name} {shape} chunk {chunk_tokens}")


@pytest.mark.parametrize("backend", ["reference", "triton"] if INTERPRET else ["reference"])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_dense_head_bfloat16_equals_unchunked(shape: tuple[int, int, int], backend: str, monkeypatch) -> None:  # noqa: ANN001
    # "triton": every chunk's loss and logits gradient come from the cross-entropy kernel
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    t, h, v = shape
    inputs = _data(t, h, v, torch.bfloat16, ("dense16", shape))
    loss, dh, dw, db = _chunked(*inputs, chunk_bytes=4 * v * 6)
    ref_loss, ref_dh, ref_dw, ref_db = _eager(*inputs, torch.bfloat16)
    # Both round the logits to bf16 before the float32 softmax; the gradient matmuls round differently.
    assert_close(loss, ref_loss, msg=f"loss {shape}")
    for name, a, e in (("dhidden", dh, ref_dh), ("dweight", dw, ref_dw), ("dbias", db, ref_db)):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, msg=f"{name} {shape}")


@pytest.mark.parametrize(
    ("shape", "backend"),
    [((17, 96, 1031), "reference"), ((9, 64, 300), "reference"),
     pytest.param((9, 64, 300), "triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"))],
)  # fmt: skip
def test_nf4_head_in_vocabulary_slices(shape: tuple[int, int, int], backend: str, monkeypatch) -> None:  # noqa: ANN001
    # "triton": each slice (views into the packed codes and statistics) goes through the dequantize kernel
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    t, h, v = shape
    hidden, weight, _, labels = _data(t, h, v, torch.float32, ("nf4", shape))
    q = quantize_nf4(weight, double_quant=True)
    nf4 = q.kernel_args()
    chunk_bytes = 2 * h * 40  # slices of a few dozen rows: several per token chunk
    slices = vocab_slices(v, h, chunk_bytes, nf4)
    assert len(slices) > 1 and slices[-1][1] == v
    for v0, _ in slices:  # each slice starts on a whole double-quantization group
        assert (v0 * h) % (64 * 256) == 0
    x = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(x, None, labels, nf4=nf4, chunk_bytes=chunk_bytes)
    loss.backward()
    dense = q.dequantize(torch.float32)
    zeros = torch.zeros(v)
    exact = _eager(hidden, dense, zeros, labels, torch.float64)
    eager = _eager(hidden, dense, zeros, labels, torch.float32)
    assert_oracle(loss, exact[0], eager[0], msg=f"loss {shape}")
    assert_oracle(x.grad, exact[1], eager[1], msg=f"dhidden {shape}")


def test_frozen_weight_gets_no_gradient_and_grad_scales() -> None:
    hidden, weight, _, labels = _data(11, 40, 97, torch.float32, ("frozen",))
    x = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(x, weight, labels, chunk_bytes=4 * 97 * 3)
    (3.0 * loss).backward()
    ref = hidden.clone().requires_grad_()
    (3.0 * F.cross_entropy(F.linear(ref, weight), labels, ignore_index=IGNORE)).backward()
    assert weight.grad is None
    assert_close(x.grad, ref.grad, msg="dhidden of 3 * loss")


def test_autocast_computes_in_the_autocast_dtype() -> None:
    hidden, weight, _, labels = _data(13, 64, 211, torch.float32, ("autocast",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)
    assert_close(got, ref, dtype=torch.bfloat16, msg="loss under bf16 autocast")


def test_no_labelled_token_gives_zero() -> None:
    hidden, weight, _, _ = _data(5, 16, 23, torch.float32, ("none",))
    x = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(x, weight, torch.full((5,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and bool((x.grad == 0).all())


def test_bad_arguments_name_themselves() -> None:
    hidden, weight, _, labels = _data(4, 16, 23, torch.float32, ("bad",))
    with pytest.raises(ValueError, match="exactly one of weight"):
        linear_cross_entropy(hidden, None, labels)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(hidden[:, :8], weight, labels)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(hidden, weight, labels[:2])
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_bytes"):
        linear_cross_entropy(hidden, weight, labels, chunk_bytes=0)
