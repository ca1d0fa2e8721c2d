"""NF4 against bitsandbytes, the format's owner (it runs on the CPU): bytes, values, state dicts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stable_seed
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpeft
from fastpeft import NF4Weight, quantize_nf4
from fastpeft.kernels import formats, nf4, reference

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

SHAPES = [(1, 1), (1, 63), (2, 32), (3, 70), (17, 129), (64, 64), (33, 257), (128, 96)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (0.02 + torch.rand((), generator=g) * 3)).to(dtype)


def _bnb_portable_dynamic8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' own portable (pure torch) blockwise quantizer, bypassing its CPU C library."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, x, F.create_dynamic_map().to(x.device), 256)


def _bnb_portable_dequantize(q: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' portable dequantizer. Its CPU C library is not used as the oracle here: in
    bitsandbytes 0.50 it disagrees with the portable path on some shapes (e.g. 48x80)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
            keys, absmax, s2.absmax, s2.code, s2.blocksize, torch.float32
        )
        absmax = absmax + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        keys, q, absmax, state.blocksize, state.quant_type, state.shape, state.dtype
    )


def test_codebook_and_dynamic_map_equal_bitsandbytes():
    assert torch.equal(formats.nf4_code(), F.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(formats.dynamic_map(), F.create_dynamic_map().float())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_bytes_and_absmax_equal_bitsandbytes(shape, dtype):
    w = _rand(shape, dtype, stable_seed(shape, str(dtype)))
    want_q, want_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    for backend in (reference.nf4_quantize_reference, nf4.nf4_quantize):  # reference and Triton kernel
        q, absmax = backend(w)
        assert q.shape == want_q.shape and q.dtype == torch.uint8
        diff = (q != want_q).nonzero()
        assert diff.numel() == 0, f"{backend.__name__}: bytes differ at {diff[:5, 0].tolist()}"
        assert torch.equal(absmax, want_state.absmax), f"{backend.__name__}: absmax differs"


@pytest.mark.parametrize("n_blocks", [2, 5, 256, 257, 700])
def test_double_quant_codes_equal_bitsandbytes_portable_backend(n_blocks):
    w = _rand((n_blocks, 64), torch.float32, n_blocks)
    weight = quantize_nf4(w, double_quant=True)
    _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    offset = state.absmax.mean()
    assert torch.equal(weight.offset.reshape(()), offset)
    want_codes, want_nested = _bnb_portable_dynamic8(state.absmax - offset)
    assert torch.equal(weight.nested_absmax, want_nested)
    diff = (weight.absmax != want_codes).nonzero().flatten()
    assert diff.numel() == 0, f"nested codes differ at {diff[:5].tolist()}"
    # and through the Triton kernel
    codes, nested = nf4.dynamic8_quantize(state.absmax - offset)
    assert torch.equal(codes, want_codes) and torch.equal(nested, want_nested)


def test_double_quant_of_a_single_block_is_exact():
    # one block: absmax - mean(absmax) == 0, the degenerate case; it must still dequantize exactly
    w = _rand((1, 64), torch.float32, 1)
    ours = quantize_nf4(w, double_quant=True)
    plain = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.dequantize(), plain.dequantize())


def test_double_quant_codes_are_nearest_where_bitsandbytes_cpu_library_differs():
    # bitsandbytes' CPU C library finds the 8-bit code by an approximate binary search; where it
    # disagrees with us, ours must be the nearest code to the scaled value (never farther than its).
    w = _rand((4000, 64), torch.float32, 11)
    ours = quantize_nf4(w, double_quant=True)
    _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    qmap = formats.dynamic_map()
    fp32_absmax = F.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax
    x = (fp32_absmax - ours.offset) / ours.nested_absmax.repeat_interleave(256)[: fp32_absmax.numel()]
    ours_err = (qmap[ours.absmax.long()] - x).abs()
    theirs_err = (qmap[state.absmax.long()] - x).abs()
    assert bool((ours_err <= theirs_err + 1e-7).all()), "a nested code is farther than bitsandbytes' choice"
    assert (ours.absmax != state.absmax).float().mean() < 0.01


@pytest.mark.parametrize("shape", [(3, 70), (17, 129), (48, 80), (300, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bitsandbytes_data_equals_bitsandbytes(shape, dtype, double_quant):
    w = _rand(shape, torch.float32, 5)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    state.dtype = dtype
    want = _bnb_portable_dequantize(q, state)
    weight = NF4Weight.from_bnb_state_dict(
        {f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()} | {"layer.weight": q}, "layer"
    )
    assert weight.double_quant == double_quant and weight.shape == torch.Size(shape)
    kernel_kwargs = {"nested_absmax": weight.nested_absmax, "offset": weight.offset} if double_quant else {}
    kernel_out = nf4.nf4_dequantize(q, weight.absmax, weight.numel, dtype, **kernel_kwargs).view(shape)
    for got in (weight.dequantize(dtype), kernel_out):
        diff = (got != want).nonzero()
        assert diff.numel() == 0, (
            f"values differ at {diff[:3].tolist()}: {got[tuple(diff[0])]} vs {want[tuple(diff[0])]}"
        )


def test_state_dict_keys_and_blob_match_bitsandbytes():
    w = _rand((40, 96), torch.float16, 3)
    ours = quantize_nf4(w).to_bnb_state_dict("model.layers.0.mlp.up_proj")
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    theirs["model.layers.0.mlp.up_proj.weight"] = q
    assert set(ours) == set(theirs)
    blob_key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    ours_blob = json.loads(bytes(ours[blob_key].tolist()))
    theirs_blob = json.loads(bytes(theirs[blob_key].tolist()))
    assert ours_blob == theirs_blob
    for k in theirs:
        if k != blob_key and "nested_absmax" not in k and not k.endswith(".absmax"):
            assert torch.equal(ours[k], theirs[k]), k


def test_state_dict_round_trips_through_bitsandbytes_both_ways():
    w = _rand((48, 80), torch.bfloat16, 9)
    ours = quantize_nf4(w)
    sd = ours.to_bnb_state_dict("p")
    # ours -> bitsandbytes
    state = F.QuantState.from_dict({k.removeprefix("p.weight."): v for k, v in sd.items() if k != "p.weight"}, "cpu")
    assert torch.equal(_bnb_portable_dequantize(sd["p.weight"], state), ours.dequantize())
    # bitsandbytes -> ours
    back = NF4Weight.from_bnb_state_dict({f"p.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
                                         | {"p.weight": sd["p.weight"]}, "p")  # fmt: skip
    assert torch.equal(back.dequantize(), ours.dequantize())
    assert back.dtype == torch.bfloat16 and back.shape == w.shape


def test_bitsandbytes_linear4bit_loads_our_state_dict():
    # the way transformers installs a pre-quantized 4-bit weight: Params4bit.from_prequantized
    linear = torch.nn.Linear(128, 40, bias=True)
    ours = quantize_nf4(linear.weight.data)
    sd = ours.to_bnb_state_dict("")
    module = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k != "weight"}
    module.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=module)
    module.bias = torch.nn.Parameter(linear.bias.data)
    x = torch.randn(5, 128)
    want = torch.nn.functional.linear(x, ours.dequantize(torch.float32), linear.bias)
    torch.testing.assert_close(module(x), want)
    # and back: what bitsandbytes saves is what we read
    back = NF4Weight.from_bnb_state_dict(module.state_dict(), "")
    assert torch.equal(back.packed, ours.packed) and torch.equal(back.dequantize(), ours.dequantize())


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    double_quant=st.booleans(),
)
def test_property_quantize_matches_bitsandbytes(rows, cols, dtype, seed, double_quant):
    w = _rand((rows, cols), dtype, seed)
    ours = quantize_nf4(w, double_quant=double_quant)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed, q)
    packed, absmax = nf4.nf4_quantize(w)
    assert torch.equal(packed, q) and torch.equal(absmax, state.absmax)
    deq = ours.dequantize(torch.float32)
    # round-trip error: at most half the widest NF4 gap (0.3038) times the block's absmax, plus
    # the error of the 8-bit absmax itself under double quantization
    absmax = state.absmax
    slack = torch.zeros_like(absmax)
    if double_quant:
        nested = ours.nested_absmax.repeat_interleave(256)[: absmax.numel()]
        slack = (ours.nested_quant_map[ours.absmax.long()] * nested + ours.offset - absmax).abs()
    per_block = 0.5 * 0.3038 * absmax + slack + 1e-6  # |code| <= 1 scales the absmax error
    bound = per_block.repeat_interleave(64)[: w.numel()].view(w.shape)
    assert bool(((deq - w.float()).abs() <= bound).all())


def test_bad_input_is_refused_with_named_problem():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=32)
    sd = quantize_nf4(torch.randn(8, 64)).to_bnb_state_dict("l")
    missing = {k: v for k, v in sd.items() if not k.endswith("nested_absmax")}
    with pytest.raises(ValueError, match=r"missing key 'l\.weight\.nested_absmax'"):
        NF4Weight.from_bnb_state_dict(missing, "l")
    bad = dict(sd)
    bad["l.weight.absmax"] = bad["l.weight.absmax"][:-1]
    with pytest.raises(ValueError, match=r"l\.weight\.absmax: expected torch\.uint8 with 8 elements"):
        NF4Weight.from_bnb_state_dict(bad, "l")
    bad = dict(sd)
    bad["l.weight"] = bad["l.weight"][:-2]
    with pytest.raises(ValueError, match=r"l\.weight: expected torch\.uint8 with 256 elements"):
        NF4Weight.from_bnb_state_dict(bad, "l")
    bad = dict(sd)
    bad["l.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not hold a JSON quant state"):
        NF4Weight.from_bnb_state_dict(bad, "l")


def _with_blob(sd: dict, prefix: str, **changes: object) -> dict:
    """``sd`` with its quant-state JSON blob edited (a key set to None is dropped)."""
    key = f"{prefix}.weight.quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(sd[key].tolist()))
    blob.update(changes)
    return {**sd, key: torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"shape": [-8, -64]}, "shape must be a list of positive ints"), ({"shape": "8x64"}, "shape must be a list"),
     ({"shape": [8, 64.0]}, "shape must be a list"), ({"blocksize": None}, "blocksize must be an int"),
     ({"blocksize": "64"}, "blocksize must be an int"), ({"nested_offset": float("nan")}, "nested_offset"),
     ({"nested_offset": 1e300}, "overflows float32"), ({"nested_blocksize": 256.5}, "nested_blocksize"),
     ({"dtype": ["float32"]}, "unsupported dtype")],
)  # fmt: skip
def test_malformed_quant_state_is_a_value_error(changes, match):
    sd = quantize_nf4(torch.randn(8, 64)).to_bnb_state_dict("l")
    with pytest.raises(ValueError, match=match):
        NF4Weight.from_bnb_state_dict(_with_blob(sd, "l", **changes), "l")


def test_quant_state_that_is_not_an_object_or_a_tensor_is_a_value_error():
    sd = quantize_nf4(torch.randn(8, 64)).to_bnb_state_dict("l")
    key = "l.weight.quant_state.bitsandbytes__nf4"
    for blob in (b"[1, 2]", b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(ValueError, match="JSON"):
            NF4Weight.from_bnb_state_dict({**sd, key: torch.tensor(list(blob), dtype=torch.uint8)}, "l")
    with pytest.raises(ValueError, match=r"l\.weight\.absmax: expected a tensor"):
        NF4Weight.from_bnb_state_dict({**sd, "l.weight.absmax": [1.0]}, "l")


def test_blocksize_must_be_an_int():
    with pytest.raises(TypeError, match="blocksize must be an int, got float 64.0"):
        quantize_nf4(torch.randn(4, 64), blocksize=64.0)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_nf4(torch.randn(4, 64), blocksize=True)


def test_double_quant_of_huge_weights_stays_finite():
    # float32's sum of the absmax overflows past ~1e35 a weight: the offset must not become inf.
    w = torch.randn(64 * 64, 64, generator=torch.Generator().manual_seed(7)) * 1e36
    q = quantize_nf4(w, double_quant=True)
    assert torch.isfinite(q.offset) and torch.isfinite(q.nested_absmax).all()
    deq = q.dequantize(torch.float32)
    scaled = quantize_nf4(w / 1e36, double_quant=True).dequantize(torch.float32) * 1e36
    assert torch.isfinite(deq).all(), "double quantization gave non-finite weights"
    # The same relative error as the weight scaled into range (the NF4 grid is scale-free).
    err, ref = (deq - w).abs().max() / w.abs().max(), (scaled - w).abs().max() / w.abs().max()
    assert err <= 1.01 * ref, f"relative error {err:.3e} vs {ref:.3e} at unit scale"


def test_public_api_exports():
    assert fastpeft.quantize_nf4 is quantize_nf4 and "NF4Weight" in fastpeft.__all__
