"""Mixed-adapter LoRA kernels (interpreter on CPU, real kernels on a GPU) against kernels/reference.py, the
reference against float64 per-row math, the tile plan, and the argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, assert_oracle, stable_seed

from fastpeft.kernels import lora_batched, reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or Triton's interpreter")


def _problem(m, k, n, ranks, adapter_dtype, y_dtype, with_bias, seed, device=DEVICE):
    """Random x, base output y, stacked adapters (ranks zero-padded to a BLOCK_R), scales, bias and an index
    with every adapter, rows of none (-1), and one adapter owning more rows than a tile."""
    g = torch.Generator().manual_seed(seed)
    r_pad = next(b for b in lora_batched.BATCHED_RANKS if b >= max(ranks))
    n_ad = len(ranks)
    a = torch.zeros(n_ad, r_pad, k)
    b = torch.zeros(n_ad, n, r_pad)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, k, generator=g) * k**-0.5
        b[i, :, :r] = torch.randn(n, r, generator=g) * r**-0.5
    index = torch.randint(-1, n_ad, (m,), generator=g)
    index[: min(m, lora_batched.BLOCK_M + 3)] = 0  # adapter 0 spans two tiles
    index[-1] = -1
    to = dict(device=device)
    return (
        torch.randn(m, n, generator=g).to(y_dtype).to(**to),
        torch.randn(m, k, generator=g).to(y_dtype).to(**to),
        a.to(adapter_dtype).to(**to),
        b.to(adapter_dtype).to(**to),
        (0.5 + torch.rand(n_ad, generator=g)).to(**to),
        index,
        (torch.randn(n_ad, n, generator=g) * 0.1).to(adapter_dtype).to(**to) if with_bias else None,
    )


def _exact(y, x, a, b, scales, index, bias):
    """float64 per row: y + s·((x·Aᵀ rounded to the adapters' dtype)·Bᵀ + b)."""
    out = y.double().clone()
    for m, i in enumerate(index.tolist()):
        if i < 0:
            continue
        u = (x[m].to(a.dtype).double() @ a[i].double().t()).to(a.dtype).double()
        d = u @ b[i].double().t() + (bias[i].double() if bias is not None else 0.0)
        out[m] += scales[i].double() * d
    return out


# (M, K, N, ranks): K past one split and not a tile multiple, N not a block multiple
SHAPES = [(40, 72, 50, (4, 16, 9)), (5, 200, 33, (32, 1)), (21, 48, 17, (20,))]
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)]


@needs_kernels
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("adapter_dtype,y_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,ranks", SHAPES)
def test_kernel_matches_reference(m, k, n, ranks, adapter_dtype, y_dtype, with_bias):
    y, x, a, b, s, index, bias = _problem(m, k, n, ranks, adapter_dtype, y_dtype, with_bias,
                                          stable_seed(m, k, n, ranks, adapter_dtype, y_dtype, with_bias))  # fmt: skip
    base = y.clone()
    got = lora_batched.lora_batched_delta(y, x, a, b, s, index, bias)
    assert got is y  # in place
    want = reference.lora_batched_delta_reference(base.clone(), x, a, b, s, index, bias)
    exact = _exact(base.cpu(), x.cpu(), a.cpu(), b.cpu(), s.cpu(), index, None if bias is None else bias.cpu())
    assert_oracle(got.cpu(), exact, want.cpu(), msg=f"{adapter_dtype}/{y_dtype}")
    untouched = index < 0
    assert torch.equal(got.cpu()[untouched], base.cpu()[untouched]), "rows without an adapter changed"


@needs_kernels
def test_kernel_splits_k_and_runs_no_tile_for_an_all_base_batch(monkeypatch):
    # few tiles and a long K: the shrink splits K into partials that the expand sums in order
    y, x, a, b, s, index, bias = _problem(3, 256, 20, (8, 8), torch.float32, torch.float32, True, 7)
    splits = []
    real = lora_batched._splits
    monkeypatch.setattr(lora_batched, "_splits", lambda *args: splits.append(real(*args)) or splits[-1])
    got = lora_batched.lora_batched_delta(y.clone(), x, a, b, s, index, bias)
    assert splits and splits[0] > 1
    exact = _exact(y.cpu(), x.cpu(), a.cpu(), b.cpu(), s.cpu(), index, bias.cpu())
    eager = reference.lora_batched_delta_reference(y.clone(), x, a, b, s, index, bias)
    assert_oracle(got.cpu(), exact, eager.cpu(), msg="split K")
    none = torch.full((3,), -1)
    assert torch.equal(lora_batched.lora_batched_delta(y.clone(), x, a, b, s, none, bias), y)


def test_reference_matches_float64_per_row():
    y, x, a, b, s, index, bias = _problem(30, 40, 24, (3, 16), torch.float32, torch.float32, True, 3, "cpu")
    got = reference.lora_batched_delta_reference(y.clone(), x, a, b, s, index, bias)
    torch.testing.assert_close(got.double(), _exact(y, x, a, b, s, index, bias), atol=1e-5, rtol=1e-5)


def test_plan_groups_rows_by_adapter_in_tiles():
    index = torch.tensor([2, 0, -1, 2, 2, 0, 2, -1])
    order, tiles = lora_batched.plan_tiles(index, 3, block_m=2)
    assert order.tolist()[:6] == [1, 5, 0, 3, 4, 6]  # stable: adapter 0's rows, then 2's; -1 rows last
    assert tiles.tolist() == [[0, 0, 2], [2, 2, 4], [2, 4, 6]]  # adapter 1 has no rows, so no tile
    covered = sorted(order[p].item() for _, start, end in tiles.tolist() for p in range(start, end))
    assert covered == sorted(i for i, v in enumerate(index.tolist()) if v >= 0)
    order, tiles = lora_batched.plan_tiles(torch.full((4,), -1), 2)
    assert tiles.shape == (0, 3)


def test_bad_arguments_are_refused():
    y, x, a, b, s, index, bias = _problem(6, 32, 8, (4,), torch.float32, torch.float32, True, 5, "cpu")
    check = reference.check_lora_batched_args
    with pytest.raises(ValueError, match=r"y must be \[6, N\]"):
        check(y[:5], x, a, b, s, index, bias)
    with pytest.raises(ValueError, match="lora_b"):
        check(y, x, a, b[:, :4], s, index, bias)
    with pytest.raises(ValueError, match="padded rank"):
        check(y, x, a[:, :8], b[:, :, :8], s, index, bias, ranks=lora_batched.BATCHED_RANKS)
    with pytest.raises(ValueError, match="lora_b's dtype"):
        check(y.half(), x, a.half(), b.float(), s, index, None)
    with pytest.raises(ValueError, match="float32 adapters"):
        check(y.to(torch.bfloat16), x, a.half(), b.half(), s, index, None)
    with pytest.raises(ValueError, match="scales"):
        check(y, x, a, b, s.double(), index, bias)
    with pytest.raises(ValueError, match=r"\[-1, 1\)"):
        check(y, x, a, b, s, torch.full((6,), 1), bias)
    with pytest.raises(ValueError, match="integer"):
        check(y, x, a, b, s, index.float(), bias)
    with pytest.raises(ValueError, match="bias"):
        check(y, x, a, b, s, index, bias[:, :3])
    with pytest.raises(ValueError, match="unit-stride"):
        check(y.t().contiguous().t(), x, a, b, s, index, bias)
    with pytest.raises(ValueError, match="float \\[M, K\\]"):
        check(y, x.long(), a, b, s, index, bias)
    u = torch.zeros(6, 16)
    with pytest.raises(ValueError, match=r"lora_b must be \[1, 8, 32\]"):
        reference.lora_batched_expand_reference(y, torch.zeros(6, 32), b, s, index, bias)
    with pytest.raises(ValueError, match="float32 adapters"):
        reference.lora_batched_expand_reference(y.to(torch.bfloat16), u, b.half(), s, index)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="bf16 products need a GPU (the interpreter's bf16 tl.dot is wrong)")
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,ranks", [(1, 4096, 4096, (16,)), (64, 4096, 1024, (8, 16, 64, 128)), *SHAPES])
def test_kernel_matches_reference_bf16_on_gpu(m, k, n, ranks, adapter_dtype):
    y, x, a, b, s, index, bias = _problem(m, k, n, ranks, adapter_dtype, torch.bfloat16, True, stable_seed(m, k, n))
    base = y.clone()
    got = lora_batched.lora_batched_delta(y, x, a, b, s, index, bias)
    eager = reference.lora_batched_delta_reference(base.clone(), x, a, b, s, index, bias)
    exact = _exact(base.cpu(), x.cpu(), a.cpu(), b.cpu(), s.cpu(), index, bias.cpu())
    assert_oracle(got.cpu(), exact, eager.cpu(), msg=f"bf16 y, {adapter_dtype} adapters")


@needs_kernels
@pytest.mark.parametrize("adapter_dtype,y_dtype", DTYPES)
def test_expand_from_given_u_matches_reference(adapter_dtype, y_dtype):
    # a LoRA embedding's path: u is gathered, not computed; the expand launch alone adds s·u·Bᵀ
    y, _, _, b, s, index, bias = _problem(37, 40, 50, (4, 16, 9), adapter_dtype, y_dtype, True, 11)
    u = (torch.randn(37, 16, generator=torch.Generator().manual_seed(12)) * 0.5).to(adapter_dtype).float()
    u = u.to(DEVICE)
    got = lora_batched.lora_batched_expand(y.clone(), u, b, s, index, bias)
    eager = reference.lora_batched_expand_reference(y.clone(), u, b, s, index, bias)
    exact = y.cpu().double().clone()
    for m, i in enumerate(index.tolist()):
        if i >= 0:
            exact[m] += s[i].double().cpu() * (u[m].double().cpu() @ b[i].double().cpu().t() + bias[i].double().cpu())
    assert_oracle(got.cpu(), exact, eager.cpu(), msg=f"expand {adapter_dtype}/{y_dtype}")
