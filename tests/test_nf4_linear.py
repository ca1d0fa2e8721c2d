"""NF4Linear: forward / backward against dense math, bitsandbytes interop, state dicts, device and dtype moves."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_oracle, failing_move
from torch import nn

from fastpeft import NF4Weight, quantize_nf4
from fastpeft.nn import NF4Linear

SHAPES = [(1, 1, 1), (3, 70, 33), (17, 129, 65), (5, 64, 128)]  # (M, in, out)
BNB_KEYS = ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"]  # fmt: skip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(k: int, n: int, seed: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    g = _gen(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * (0.1 + torch.rand((), generator=g)))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin.to(dtype)


@pytest.fixture
def bnb():
    """bitsandbytes, the format's owner (runs on the CPU); the GPU image may lack it, so only its tests skip."""
    return pytest.importorskip("bitsandbytes")


def _bnb_linear4bit(lin: nn.Linear, double_quant: bool = True) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                           compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=double_quant)  # fmt: skip
    if lin.bias is not None:
        l4.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return l4.to("cpu")  # bitsandbytes quantizes on the device move


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_backward_match_dense_dequantized_math(m, k, n, double_quant):
    lin = _linear(k, n, seed=m * 1000 + k)
    layer = NF4Linear.from_linear(lin, double_quant=double_quant)
    assert layer.in_features == k and layer.out_features == n
    assert not any(p.requires_grad for p in layer.parameters()), "NF4Linear must have no trainable parameters"
    w = quantize_nf4(lin.weight.detach(), double_quant=double_quant).dequantize()
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(2, m, k, generator=_gen(m + k)).requires_grad_(True)
    y = layer(x)
    assert y.shape == (2, m, n)
    exact = x.detach().double() @ w.double().t() + lin.bias.detach().double()
    assert_oracle(y, exact, torch.nn.functional.linear(x.detach(), w, lin.bias.detach()), msg="NF4Linear forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_oracle(x.grad, dy.double() @ w.double(), dy @ w, msg="NF4Linear dx")
    assert all(p.grad is None for p in layer.parameters())


def test_trainable_bias_gets_sum_of_output_gradients():
    layer = NF4Linear.from_linear(_linear(33, 17, seed=3))
    layer.bias.requires_grad_(True)
    x = torch.randn(7, 33, generator=_gen(1))
    dy = torch.randn(7, 17, generator=_gen(2))
    layer(x).backward(dy)
    assert_close(layer.bias.grad, dy.sum(0), msg="dbias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_and_compute_dtype(dtype):
    lin = _linear(70, 33, seed=5)
    layer = NF4Linear.from_linear(lin).to(dtype)
    x = torch.randn(4, 70, generator=_gen(6)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    w = layer.dequantize(torch.float64)
    exact = x.double() @ w.t() + layer.bias.double()
    eager = torch.nn.functional.linear(x, w.to(dtype), layer.bias)
    assert_oracle(y, exact, eager, msg=f"{dtype} forward")
    # compute_dtype: the input is cast to it and the result cast back (bitsandbytes' rule)
    layer.compute_dtype = dtype
    y32 = layer(x.float())
    assert y32.dtype == torch.float32
    assert torch.equal(y32, y.float())


def test_autocast_returns_autocast_dtype():
    layer = NF4Linear.from_linear(_linear(70, 33, seed=8))
    x = torch.randn(3, 70, generator=_gen(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want = torch.nn.functional.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert_close(y, want, msg="autocast forward")


def test_from_bnb_reuses_bytes_and_matches_bitsandbytes(bnb):
    lin = _linear(129, 65, seed=11)
    l4 = _bnb_linear4bit(lin)
    layer = NF4Linear.from_bnb(l4)
    assert layer.packed.data_ptr() == l4.weight.data.data_ptr(), "packed bytes were copied, not reused"
    assert layer.weight is layer.packed and layer.weight.shape == l4.weight.shape
    assert layer.absmax.data_ptr() == l4.weight.quant_state.absmax.data_ptr()
    want_w = bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state)
    assert torch.equal(layer.dequantize(), want_w), "dequantized weight differs from bitsandbytes'"
    x = torch.randn(9, 129, generator=_gen(12))
    exact = x.double() @ want_w.double().t() + lin.bias.detach().double()
    assert_oracle(layer(x), exact, l4(x).detach(), msg="NF4Linear.from_bnb vs Linear4bit")


def test_from_bnb_refuses_fp4_and_unquantized(bnb):
    lin = _linear(64, 8, seed=1)
    fp4 = bnb.nn.Linear4bit(64, 8, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Linear.from_bnb(fp4.to("cpu"))
    with pytest.raises(ValueError, match="quant_state"):
        NF4Linear.from_bnb(nn.Linear(4, 4))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_bitsandbytes_format_and_round_trips(bnb, double_quant):
    lin = _linear(70, 33, seed=21)
    l4 = _bnb_linear4bit(lin, double_quant=double_quant)
    ours = NF4Linear.from_linear(lin, double_quant=double_quant)
    sd, want = ours.state_dict(), l4.state_dict()
    assert list(sd) == list(want), f"keys {list(sd)} != bitsandbytes' {list(want)}"
    if double_quant:
        assert list(sd) == BNB_KEYS
    for key in want:
        assert sd[key].dtype == want[key].dtype and sd[key].shape == want[key].shape, key
        if key != "weight.quant_state.bitsandbytes__nf4":  # the JSON blob may differ in field order
            diff = (sd[key] != want[key]).nonzero()
            assert diff.numel() == 0, f"{key} differs from bitsandbytes' at {diff[:5].tolist()}"

    # our state dict -> NF4Weight.from_bnb_state_dict
    w = NF4Weight.from_bnb_state_dict(sd)
    assert torch.equal(w.dequantize(), ours.dequantize())
    # our state dict -> a fresh bitsandbytes Linear4bit, through bitsandbytes' own loader for quantized
    # checkpoints (the one transformers uses; Linear4bit.load_state_dict itself only takes float weights)
    fresh = _bnb_linear4bit(_linear(70, 33, seed=99), double_quant=double_quant)
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    fresh.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=fresh)
    fresh.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})
    x = torch.randn(5, 70, generator=_gen(22))
    assert torch.equal(fresh(x), l4(x)), "Linear4bit loaded from our state dict computes differently"
    # bitsandbytes' state dict -> a fresh NF4Linear (built from other weights)
    other = NF4Linear.from_linear(_linear(70, 33, seed=98), double_quant=double_quant)
    other.load_state_dict(want)
    assert torch.equal(other.dequantize(), ours.dequantize())
    assert torch.equal(other.bias, lin.bias.detach())
    assert torch.equal(other(x), ours(x))


def test_load_state_dict_reports_missing_unexpected_and_mismatched_keys():
    ours = NF4Linear.from_linear(_linear(70, 33, seed=31))
    sd = ours.state_dict()
    missing = {k: v for k, v in sd.items() if k != "bias"}
    result = NF4Linear.from_linear(_linear(70, 33, seed=32)).load_state_dict(missing, strict=False)
    assert result.missing_keys == ["bias"]
    with pytest.raises(RuntimeError, match="Unexpected key"):
        NF4Linear.from_linear(_linear(70, 33, seed=33)).load_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        NF4Linear.from_linear(_linear(71, 33, seed=34)).load_state_dict(sd)
    broken = dict(sd)
    del broken["weight.nested_absmax"]
    with pytest.raises(RuntimeError, match="nested_absmax"):
        NF4Linear.from_linear(_linear(70, 33, seed=35)).load_state_dict(broken)


def test_state_dict_under_a_parent_prefix():
    model = nn.Sequential(nn.Linear(8, 70), NF4Linear.from_linear(_linear(70, 33, seed=41)))
    sd = model.state_dict()
    assert [k for k in sd if k.startswith("1.")] == [f"1.{k}" for k in BNB_KEYS]
    w = NF4Weight.from_bnb_state_dict(sd, prefix="1")
    assert torch.equal(w.dequantize(), model[1].dequantize())
    clone = nn.Sequential(nn.Linear(8, 70), NF4Linear.from_linear(_linear(70, 33, seed=42)))
    clone.load_state_dict(sd)
    x = torch.randn(3, 8, generator=_gen(43))
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("double_quant", [True, False])
def test_dtype_moves_keep_the_quantized_buffers(double_quant):
    layer = NF4Linear.from_linear(_linear(70, 33, seed=51), double_quant=double_quant)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.float16)
    assert layer.bias.dtype == torch.float16
    for key, v in layer.state_dict().items():
        if key != "bias":
            assert v.dtype == before[key].dtype and torch.equal(v, before[key]), f"{key} changed under .to(float16)"
    layer.half().float()
    assert torch.equal(layer.absmax, before["weight.absmax"])
    assert torch.equal(layer.quant_map, before["weight.quant_map"])
    if double_quant:
        assert layer.offset.dtype == torch.float32 and layer.nested_absmax.dtype == torch.float32


def test_failed_move_leaves_the_layer_as_it_was():
    layer = NF4Linear.from_linear(_linear(70, 33, seed=56))
    x = torch.randn(3, 70, generator=_gen(57))
    want = layer(x)
    before = {**dict(layer.named_buffers()), **dict(layer.named_parameters())}
    ptrs = {k: t.data_ptr() for k, t in before.items()}
    for fail_at in range(len(before)):
        with pytest.raises(RuntimeError, match="injected"):
            layer._apply(failing_move(fail_at))
        now = {**dict(layer.named_buffers()), **dict(layer.named_parameters())}
        assert now.keys() == before.keys(), f"failing at tensor {fail_at}: {sorted(before.keys() - now.keys())} lost"
        moved = [k for k in now if now[k] is not before[k] or now[k].data_ptr() != ptrs[k]]
        assert not moved, f"failing at tensor {fail_at}: {moved} changed"
        assert torch.equal(layer(x), want)
    if not HAS_CUDA:  # the reported case: a move to a device this machine lacks
        with pytest.raises(ValueError, match="not available"):
            layer.to("cuda")
        assert torch.equal(layer(x), want)
    layer._apply(failing_move(len(before)))  # a move that succeeds still moves everything
    assert all(layer.get_buffer(k).data_ptr() != ptrs[k] for k, _ in layer.named_buffers())


def test_a_weight_without_elements_is_refused():
    w = quantize_nf4(torch.randn(8, 64, generator=_gen(59)))
    for shape in ((-8, -64), (0, 64), (512,)):
        with pytest.raises(ValueError, match="non-empty 2-D"):
            NF4Linear(NF4Weight(w.packed, w.absmax, torch.Size(shape), w.dtype, offset=w.offset,
                                nested_absmax=w.nested_absmax))  # fmt: skip


def test_integer_and_bool_inputs_are_refused():
    layer = NF4Linear.from_linear(_linear(64, 32, seed=58), compute_dtype=torch.float32)
    for x in (torch.randint(-3, 3, (2, 64)), torch.ones(2, 64, dtype=torch.bool)):
        with pytest.raises(TypeError, match=f"floating-point tensor, got {x.dtype}"):
            layer(x)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_move_and_bf16_forward():
    lin = _linear(4096 // 8, 1024 // 8 + 3, seed=61)
    layer = NF4Linear.from_linear(lin).cuda().to(torch.bfloat16)
    for name in ("packed", "absmax", "quant_map", "nested_absmax", "offset", "nested_quant_map"):
        assert getattr(layer, name).is_cuda, name
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    x = torch.randn(17, lin.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(torch.float64)
    exact = x.detach().double() @ w.t() + layer.bias.double()
    eager = torch.nn.functional.linear(x.detach(), w.to(torch.bfloat16), layer.bias)
    assert_oracle(y, exact, eager, msg="cuda bf16 forward")
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    back = layer.cpu()
    assert back.packed.device.type == "cpu"


def test_kernel_args_describe_the_weight():
    w = quantize_nf4(torch.randn(33, 70, generator=_gen(71)), blocksize=128, double_quant=True)
    args = w.kernel_args()
    assert args.shape == (33, 70) and args.blocksize == 128 and args.nested_blocksize == w.nested_blocksize
    assert args.packed is w.packed and args.absmax is w.absmax and args.nested_absmax is w.nested_absmax
    assert args.offset is w.offset and args.quant_map is w.quant_map and args.nested_quant_map is w.nested_quant_map
    layer = NF4Linear(w)
    assert all(a is b or a == b for a, b in zip(layer.kernel_args(), args, strict=True))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.randn(4, 8, 8)).kernel_args()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_through_the_interpreter(monkeypatch, double_quant, dtype):
    # the Triton path runs the fused GEMM forward and backward, never the standalone dequantize: the dense
    # weight is not materialized; results match the reference path
    from fastpeft.kernels import lora_linear as lora_kernels
    from fastpeft.kernels import nf4 as nf4_kernels

    calls = {"fwd": 0, "bwd_dx": 0, "dequantize": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(lora_kernels, "nf4_linear_fwd", counted("fwd", lora_kernels.nf4_linear_fwd))
    monkeypatch.setattr(lora_kernels, "nf4_linear_bwd_dx", counted("bwd_dx", lora_kernels.nf4_linear_bwd_dx))
    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", counted("dequantize", nf4_kernels.nf4_dequantize))
    layer = NF4Linear.from_linear(_linear(129, 65, seed=81), double_quant=double_quant).to(dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 9, 129, generator=_gen(82)).to(dtype)  # M = 18 rows: the tiled path
    dy = torch.randn(2, 9, 65, generator=_gen(83)).to(dtype)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        layer.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.backward(dy)
        results.append((y.detach(), xx.grad, layer.bias.grad.clone()))
    assert calls == {"fwd": 1, "bwd_dx": 1, "dequantize": 0}, f"launches on the Triton path: {calls}"
    w = layer.dequantize(torch.float64)
    exact = (x.double() @ w.t() + layer.bias.detach().double(), dy.double() @ w, dy.double().sum((0, 1)))
    for what, got, want, ex in zip(("y", "dx", "dbias"), results[1], results[0], exact, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype}"
        # both paths round W to the input dtype and accumulate in float32: within twice the reference's error
        assert_oracle(got, ex, want, msg=f"triton backend {what}, {dtype}, double_quant={double_quant}")


def test_empty_batch_and_float64_take_no_kernel(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    layer = NF4Linear.from_linear(_linear(70, 33, seed=84))
    x = torch.randn(0, 70, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 70)
    # float64 (gradcheck) has no kernel: the reference runs on every backend
    x64 = torch.randn(3, 70, dtype=torch.float64, generator=_gen(85), requires_grad=True)
    layer64 = NF4Linear.from_linear(_linear(70, 33, seed=84)).double()
    assert torch.autograd.gradcheck(lambda t: layer64(t), (x64,))


@pytest.mark.parametrize("double_quant", [True, False])
def test_ops_pass_torch_library_opcheck(double_quant):
    # schema, fake (meta) implementation and autograd registration of both ops, as torch.compile needs them
    from fastpeft.ops.lora import _flat_nf4, nf4_linear_bwd_dx, nf4_linear_op

    layer = NF4Linear.from_linear(_linear(70, 33, seed=86), double_quant=double_quant)
    flat = _flat_nf4(layer.kernel_args())
    x = torch.randn(5, 70, generator=_gen(87), requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    torch.library.opcheck(nf4_linear_op, (x, bias, *flat))
    torch.library.opcheck(nf4_linear_bwd_dx, (torch.randn(5, 33, generator=_gen(88)), *flat))
