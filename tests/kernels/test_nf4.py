"""NF4 Triton kernels (interpreter on CPU) against kernels/reference.py and bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from conftest import stable_seed

from fastpeft.kernels import nf4, reference

SHAPES = [(1,), (7,), (64,), (65,), (3, 70), (17, 129), (5, 64 * 3 + 1), (40, 97)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand((), generator=g) * 4).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_kernel_matches_reference(shape, dtype):
    w = _rand(shape, dtype, stable_seed(shape, str(dtype)))
    packed, absmax = nf4.nf4_quantize(w)
    ref_packed, ref_absmax = reference.nf4_quantize_reference(w)
    assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    diff = (packed != ref_packed).nonzero()
    assert diff.numel() == 0, f"packed bytes differ at {diff[:5].flatten().tolist()}"
    assert torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_quantize_kernel_other_blocksizes(blocksize):
    w = _rand((9, 301), torch.float32, blocksize)
    for got, want in zip(nf4.nf4_quantize(w, blocksize), reference.nf4_quantize_reference(w, blocksize), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_dynamic8_kernel_matches_reference(n):
    x = _rand((n,), torch.float32, n) - 0.3
    codes, absmax = nf4.dynamic8_quantize(x)
    ref_codes, ref_absmax = reference.dynamic8_quantize_reference(x)
    diff = (codes != ref_codes).nonzero().flatten()
    assert diff.numel() == 0, f"codes differ at {diff[:5].tolist()}: {codes[diff[:5]]} vs {ref_codes[diff[:5]]}"
    assert torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("shape", [(1,), (3, 70), (17, 129), (300, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_matches_reference(shape, dtype, double_quant):
    w = _rand(shape, torch.float32, 7)
    packed, absmax = reference.nf4_quantize_reference(w)
    kw = {}
    if double_quant:
        offset = absmax.mean()
        absmax, nested = reference.dynamic8_quantize_reference(absmax - offset)
        kw = {"nested_absmax": nested, "offset": offset}
    got = nf4.nf4_dequantize(packed, absmax, w.numel(), dtype, **kw)
    want = reference.nf4_dequantize_reference(packed, absmax, w.numel(), dtype, **kw)
    assert got.dtype == dtype and got.shape == (w.numel(),)
    diff = (got != want).nonzero().flatten()
    assert diff.numel() == 0, f"values differ at {diff[:5].tolist()}: {got[diff[:5]]} vs {want[diff[:5]]}"


@pytest.mark.parametrize("blocksize", [128, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_other_blocksizes(blocksize, double_quant):
    # the blocksize is a runtime shift in the kernel: every supported size runs the same binary
    w = _rand((37, 300), torch.float32, blocksize)
    packed, absmax = reference.nf4_quantize_reference(w, blocksize)
    kw = {"blocksize": blocksize}
    if double_quant:
        offset = absmax.mean()
        absmax, nested = reference.dynamic8_quantize_reference(absmax - offset)
        kw |= {"nested_absmax": nested, "offset": offset}
    got = nf4.nf4_dequantize(packed, absmax, w.numel(), torch.float16, **kw)
    want = reference.nf4_dequantize_reference(packed, absmax, w.numel(), torch.float16, **kw)
    diff = (got != want).nonzero().flatten()
    assert diff.numel() == 0, f"values differ at {diff[:5].tolist()}: {got[diff[:5]]} vs {want[diff[:5]]}"


@pytest.mark.parametrize("numel", [2 * 4096, 2 * 4096 - 1, 3 * 4096 + 64 * 5 + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_tiles_tail_and_custom_map(numel, dtype):
    # whole 4096-weight tiles only, an odd count ending inside the last tile, whole tiles plus a tail; the
    # custom quant_map is a view at a 4-byte offset, which the launcher must realign for its table lookups
    w = _rand((numel,), torch.float32, numel)
    packed, absmax = reference.nf4_quantize_reference(w)
    storage = torch.randn(17, generator=torch.Generator().manual_seed(numel)).sort().values
    quant_map = storage[1:]
    assert quant_map.data_ptr() % 64 != 0
    got = nf4.nf4_dequantize(packed, absmax, numel, dtype, quant_map=quant_map)
    want = reference.nf4_dequantize_reference(packed, absmax, numel, dtype, quant_map=quant_map)
    diff = (got != want).nonzero().flatten()
    assert diff.numel() == 0, f"values differ at {diff[:5].tolist()}: {got[diff[:5]]} vs {want[diff[:5]]}"


def test_all_zero_blocks_dequantize_to_zero():
    w = _rand((4, 64), torch.float32, 3)
    w[1] = 0.0  # one whole block of zeros
    w[3, :10] = 0.0
    packed, absmax = nf4.nf4_quantize(w)
    assert absmax[1] == 0
    out = nf4.nf4_dequantize(packed, absmax, w.numel()).view(4, 64)
    assert torch.equal(out[1], torch.zeros(64))
    assert torch.equal(out[3, :10], torch.zeros(10))


def test_launchers_reject_bad_input():
    with pytest.raises(TypeError, match="w must be float32"):
        nf4.nf4_quantize(torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="w is empty"):
        nf4.nf4_quantize(torch.ones(0))
    with pytest.raises(ValueError, match="non-finite"):
        nf4.nf4_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.nf4_quantize(torch.ones(64), blocksize=48)
    with pytest.raises(ValueError, match="contiguous"):
        nf4.nf4_quantize(torch.ones(8, 8).t())
    packed, absmax = nf4.nf4_quantize(torch.randn(100))
    with pytest.raises(ValueError, match="packed has 50 bytes"):
        nf4.nf4_dequantize(packed, absmax, 120)
    with pytest.raises(ValueError, match="needs nested_absmax"):
        nf4.nf4_dequantize(packed, absmax.to(torch.uint8), 100)


@pytest.mark.parametrize("launcher", [nf4.nf4_dequantize, reference.nf4_dequantize_reference])
def test_dequantize_rejects_layouts_the_kernel_would_misread(launcher):
    w = torch.randn(4 * 64 * 256 + 3)
    packed, absmax = reference.nf4_quantize_reference(w)
    n = w.numel()
    strided = torch.stack([absmax, absmax], dim=1)[:, 0]
    with pytest.raises(ValueError, match="absmax must be contiguous"):
        launcher(packed, strided, n)
    with pytest.raises(ValueError, match="quant_map must be a float tensor of 16 values"):
        launcher(packed, absmax, n, quant_map=torch.zeros(15))
    offset = absmax.mean().reshape(1)
    codes, nested = reference.dynamic8_quantize_reference(absmax - offset)
    nested_strided = torch.stack([nested, nested], dim=1)[:, 0]
    with pytest.raises(ValueError, match="nested_absmax must be contiguous"):
        launcher(packed, codes, n, nested_absmax=nested_strided, offset=offset)
    with pytest.raises(ValueError, match="nested_quant_map must be a float tensor of 256 values"):
        launcher(packed, codes, n, nested_absmax=nested, offset=offset, nested_quant_map=torch.zeros(16))
    with pytest.raises(ValueError, match="offset must be a float tensor of one element"):
        launcher(packed, codes, n, nested_absmax=nested, offset=torch.zeros(2))
    with pytest.raises(ValueError, match="offset is on meta"):
        launcher(packed, codes, n, nested_absmax=nested, offset=offset.to("meta"))
