"""Composition of bottleneck adapters (Stack, Parallel, Average, BatchSplit; AdapterHub's names), mixed batches of
bottleneck adapters, and LoRA beside a bottleneck adapter in one model: each against plain torch on hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET
from safetensors.torch import load_file
from tiny_models import batch, build, logits, max_diff, randomize, trainable_names, twin

from fastpeft import AdapterConfig, LoraConfig, PeftModel, get_peft_model
from fastpeft.peft.adapters import AdapterWrapper
from fastpeft.peft.composition import Average, BatchSplit, Fuse, Parallel, Stack

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}
TOL = 2e-5


def delta(adapter, h):
    """``s·up(act(down(h)))`` in plain torch."""
    z = h @ adapter.down.weight.T + adapter.down.bias
    return adapter.scaling * (ACTS[adapter.activation](z) @ adapter.up.weight.T + adapter.up.bias)


def single(w, name, h, r):
    return r + delta(w.bottleneck[name], h) if name in w.bottleneck else r


def stack(*names):
    def fn(w, h, r):
        y = single(w, names[0], h, r)
        for name in names[1:]:
            y = single(w, name, y, y)
        return y

    return fn


def average(names, weights):
    def fn(w, h, r):
        return r + sum(wt * delta(w.bottleneck[n], h) for n, wt in zip(names, weights, strict=True))

    return fn


def batch_split(fns, sizes):
    def fn(w, h, r):
        return torch.cat([f(w, hp, rp) for f, hp, rp in zip(fns, h.split(sizes), r.split(sizes), strict=True)], dim=0)

    return fn


def hooked_logits(plain, pm, fn, inputs):
    """``plain`` (the base model's twin) with ``fn(wrapper, h, r)`` hooked in at every wrapper of ``pm``: the output
    of the composition's semantics computed by hand."""
    handles = []
    for path, w in pm.get_base_model().named_modules():
        if not isinstance(w, AdapterWrapper):
            continue
        target = plain.get_submodule(path)
        if w.mode == "after":
            handles.append(target.register_forward_hook(lambda m, a, out, w=w: fn(w, out, out)))
        elif w.mode == "parallel":
            handles.append(target.register_forward_hook(lambda m, a, out, w=w: fn(w, a[0], out)))
        else:  # BERT's residual input
            handles.append(target.register_forward_pre_hook(lambda m, a, w=w: (a[0], fn(w, a[1], a[1]), *a[2:])))
    try:
        return logits(plain, inputs)
    finally:
        for h in handles:
            h.remove()


def three_adapters(arch="llama", placement="pfeiffer"):
    model = build(arch)
    plain = twin(model)
    pm = get_peft_model(model, AdapterConfig(bottleneck_size=5, placement=placement, non_linearity="gelu"), "a")
    pm.add_adapter("b", AdapterConfig(bottleneck_size=3, placement=placement, scaling=0.6, non_linearity="gelu_new"))
    pm.add_adapter("c", AdapterConfig(bottleneck_size=4, placement=placement, non_linearity="silu"))
    randomize(pm, ("bottleneck",), seed=11)
    return pm, plain


@pytest.mark.parametrize(("arch", "placement"), [("llama", "pfeiffer"), ("gpt2", "houlsby"), ("llama", "parallel"),
                                                 ("bert", "parallel")])  # fmt: skip
def test_stack_average_batch_split_equal_plain_torch(arch, placement):
    pm, plain = three_adapters(arch, placement)
    inputs = batch(3, 6, seed=3)
    cases = [
        (Stack("a", "b"), stack("a", "b")),
        (Stack("c", "a", "b"), stack("c", "a", "b")),
        (Average("a", "b", weights=[3.0, 1.0]), average(["a", "b"], [0.75, 0.25])),
        (Average("a", "b", "c"), average(["a", "b", "c"], [1 / 3] * 3)),
        (Average("a", "b", weights=[2.0, -0.5], normalize_weights=False), average(["a", "b"], [2.0, -0.5])),
        (BatchSplit("a", "b", batch_sizes=[1, 2]), batch_split([stack("a"), stack("b")], [1, 2])),
        (
            BatchSplit("c", "a", "b", batch_sizes=[0, 2, 1]),
            batch_split([stack("c"), stack("a"), stack("b")], [0, 2, 1]),
        ),
        (
            Stack("a", Average("b", "c", weights=[1, 1])),
            lambda w, h, r: average(["b", "c"], [0.5, 0.5])(w, stack("a")(w, h, r), stack("a")(w, h, r)),
        ),
        (
            BatchSplit(Stack("a", "b"), "c", batch_sizes=[2, 1]),
            batch_split([stack("a", "b"), stack("c")], [2, 1]),
        ),
    ]
    for setup, fn in cases:
        pm.set_active_adapters(setup)
        assert pm.active_composition == setup
        got, want = logits(pm, inputs), hooked_logits(plain, pm, fn, inputs)
        assert max_diff(got, want) < TOL, f"{arch}/{placement} {setup}: off by {max_diff(got, want):.3e}"
    # a one-name Stack is the single adapter (which runs the fused path)
    pm.set_adapter("b")
    single_b = logits(pm, inputs)
    pm.set_adapter(Stack("b"))
    assert max_diff(logits(pm, inputs), single_b) < TOL


def test_batch_split_equals_each_slice_with_its_own_adapter():
    pm, _ = three_adapters()
    inputs = batch(4, 7, seed=5)
    pm.set_adapter(BatchSplit("b", "a", batch_sizes=[3, 1]))
    got = logits(pm, inputs)
    for name, rows in (("b", slice(0, 3)), ("a", slice(3, 4))):
        pm.set_adapter(name)
        want = logits(pm, {k: v[rows] for k, v in inputs.items()})
        assert max_diff(got[rows], want) < TOL, name
    # mixed batches by name, as for LoRA: the same rows through the same adapters
    pm.set_adapter("c")
    mixed = logits_with(pm, inputs, adapter_names=["b", "b", "b", "a"])
    assert max_diff(mixed, got) < TOL
    base = logits_with(pm, inputs, adapter_names=["__base__"] * 4)
    with pm.disable_adapter():
        assert max_diff(base, logits(pm, inputs)) == 0.0


def logits_with(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parallel_runs_each_adapter_on_the_whole_batch(arch):
    pm, _ = three_adapters(arch)
    inputs = batch(2, 6, seed=6)
    want = []
    for name in ("c", "a", "b"):
        pm.set_adapter(name)
        want.append(logits(pm, inputs))
    pm.set_active_adapters(Parallel("c", "a", "b"))
    out = pm(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape[0] == 6
    assert max_diff(out.logits, torch.cat(want)) < TOL
    # Parallel of blocks: each channel its own setup
    pm.set_adapter(Parallel(Stack("a", "b"), "c"))
    pm_stack = logits(pm, inputs)
    pm.set_adapter(Stack("a", "b"))
    assert max_diff(pm_stack[:2], logits(pm, inputs)) < TOL
    # generate repeats the prompt too: one continuation per adapter
    pm.set_adapter(Parallel("a", "b"))
    gen = pm.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[0] == 4
    pm.set_adapter("b")
    gen_b = pm.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[2:], gen_b)


@pytest.mark.parametrize(
    "setup",
    [
        Stack("a", "b"),
        Average("a", "b", "c", weights=[0.2, 0.3, 0.5]),
        BatchSplit("a", "b", batch_sizes=[1, 1]),
        Parallel("a", "b", "c"),
    ],  # fmt: skip
)
def test_gradients_reach_every_adapter_in_the_block(setup):
    pm, _ = three_adapters("qwen2")
    pm.train()
    pm.set_active_adapters(setup)
    names = setup.flatten()
    trainable = trainable_names(pm)
    assert trainable and all(any(f".bottleneck.{n}." in t for n in names) for t in trainable)
    for n in names:
        assert any(f".bottleneck.{n}." in t for t in trainable), n
    inputs = batch(2, 6, seed=7)
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()
    for path, w in pm.get_base_model().named_modules():
        if isinstance(w, AdapterWrapper):
            for n in names:
                for p in (w.bottleneck[n].down.weight, w.bottleneck[n].up.weight):
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{setup}: no gradient at {path} {n}"
            for n in set(w.bottleneck) - set(names):
                assert w.bottleneck[n].up.weight.grad is None


def test_save_load_keeps_each_adapter(tmp_path):
    pm, plain = three_adapters("gpt2", "houlsby")
    inputs = batch(2, 6, seed=8)
    setup = Stack("a", Average("b", "c", weights=[1, 3]))
    pm.set_active_adapters(setup)
    want = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() is False  # no adapter is called "default"
    for name in ("a", "b", "c"):
        keys = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert all(".bottleneck." in k and f".bottleneck.{name}." not in k for k in keys), sorted(keys)[:2]
    again = PeftModel.from_pretrained(twin(plain), tmp_path / "a", adapter_name="a")
    again.load_adapter(tmp_path / "b", "b")
    again.load_adapter(tmp_path / "c", "c")
    again.set_active_adapters(setup)
    assert max_diff(logits(again, inputs), want) == 0.0
    # the block stays active through adding, loading and deleting other adapters
    again.add_adapter("d", AdapterConfig(bottleneck_size=2, placement="houlsby"))
    assert again.active_composition == setup and max_diff(logits(again, inputs), want) == 0.0
    again.load_adapter(tmp_path / "b", "b2")
    assert again.active_composition == setup and max_diff(logits(again, inputs), want) == 0.0
    again.delete_adapter("b2")
    again.delete_adapter("d")
    assert again.active_composition == setup
    again.delete_adapter("b")  # the block loses an adapter: its first adapter stays active
    assert again.active_composition is None and again.active_adapters == ["a"]


def test_bad_input_raises_naming_the_argument():
    pm, _ = three_adapters()
    with pytest.raises(ValueError, match="adapter nope does not exist"):
        pm.set_active_adapters(Stack("a", "nope"))
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        pm.set_adapter(["nope"])
    with pytest.raises(ValueError, match="cannot nest Parallel"):
        pm.set_active_adapters(Stack("a", Parallel("b", "c")))
    with pytest.raises(ValueError, match="no fusion 'a,b' was added: call add_adapter_fusion"):
        pm.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(ValueError, match="composition block"):
        pm.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 children"):
        Average("a", "b", weights=[1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        Average("a", "b", weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="sum to 0"):
        Average("a", "b", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="more than once"):
        Average("a", "a")
    with pytest.raises(ValueError, match="batch_sizes has 3 entries"):
        BatchSplit("a", "b", batch_sizes=[1, 1, 1])
    with pytest.raises(ValueError, match="batch_sizes must be non-negative ints"):
        BatchSplit("a", "b", batch_sizes=[1, -1])
    with pytest.raises(ValueError, match="children must name at least one adapter"):
        Stack()
    with pytest.raises(ValueError, match="children must be adapter names"):
        Stack("a", 3)
    pm.set_adapter(BatchSplit("a", "b", batch_sizes=[1, 1]))
    with pytest.raises(ValueError, match=r"batch_sizes \[1, 1\] add up to 2, but the batch has 3 rows"):
        logits(pm, batch(3))
    with pytest.raises(ValueError, match="Average"):
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
    pm.set_adapter(Parallel("a", "b"))
    with pytest.raises(ValueError, match="Parallel"):
        logits_with(pm, batch(2), adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="not a multiple of 2"):  # run past PeftModel, nothing repeated the batch
        pm.get_base_model().model.layers[0].mlp(torch.randn(3, 4, 32))
    assert pm.active_adapters == ["a", "b"]


# -- Fuse (AdapterFusion) ---------------------------------------------------------------------------------------------


def fuse(*names):
    """AdapterFusion by hand: softmax over the adapters of query(h)·key(δᵢ), weighting value(δᵢ)."""

    def fn(w, h, r):
        f = w.fusion[",".join(names)]
        d = torch.stack([delta(w.bottleneck[n], h) for n in names], dim=-2)
        q = h @ f.query.weight.T + f.query.bias
        k = d @ f.key.weight.T + f.key.bias
        v = d @ f.value.weight.T + f.value.bias
        p = torch.softmax((k * q.unsqueeze(-2)).sum(-1), dim=-1)
        return r + (p.unsqueeze(-1) * v).sum(-2)

    return fn


@pytest.mark.parametrize(("arch", "placement"), [("llama", "pfeiffer"), ("gpt2", "houlsby"), ("bert", "parallel")])
def test_fuse_equals_attention_over_the_adapters(arch, placement):
    pm, plain = three_adapters(arch, placement)
    inputs = batch(3, 6, seed=4)
    pm.add_adapter_fusion(Fuse("a", "b", "c"))
    pm.add_adapter_fusion(["b", "c"])
    fresh = [m for m in pm.modules() if type(m).__name__ == "AdapterFusion"]
    assert fresh and all(torch.equal(m.value.weight, torch.eye(32)) for m in fresh)
    randomize(pm, ("fusion",), seed=14)
    for setup, fn in [
        (Fuse("a", "b", "c"), fuse("a", "b", "c")),
        (Stack("a", Fuse("b", "c")), stack_then(stack("a"), fuse("b", "c"))),
    ]:
        pm.set_active_adapters(setup)
        got, want = logits(pm, inputs), hooked_logits(plain, pm, fn, inputs)
        assert max_diff(got, want) < TOL, f"{arch}/{placement} {setup}: off by {max_diff(got, want):.3e}"


def stack_then(first, second):
    def fn(w, h, r):
        y = first(w, h, r)
        return second(w, y, y)

    return fn


def test_fuse_trains_its_fusion_only_and_saves_apart(tmp_path):
    pm, plain = three_adapters("qwen2")
    pm.save_pretrained(tmp_path / "adapters")
    # AdapterHub's workflow: adapters trained before, loaded frozen, then a fusion trained over them
    again = PeftModel.from_pretrained(twin(plain), tmp_path / "adapters" / "a", adapter_name="a")
    for name in ("b", "c"):
        again.load_adapter(tmp_path / "adapters" / name, name)
    again.add_adapter_fusion(Fuse("a", "b", "c"), set_active=True)
    again.train()
    trainable = trainable_names(again)
    assert trainable and all(".fusion.a,b,c." in n for n in trainable), sorted(trainable)[:3]
    inputs = batch(2, 6, seed=15)
    again(**inputs, labels=inputs["input_ids"]).loss.backward()
    for path, w in again.get_base_model().named_modules():
        if isinstance(w, AdapterWrapper):
            f = w.fusion["a,b,c"]
            for p in (f.query.weight, f.key.weight, f.value.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0, path
            assert all(w.bottleneck[n].up.weight.grad is None for n in "abc")
    again.eval()
    want = logits(again, inputs)
    again.save_adapter_fusion(tmp_path / "fusion", Fuse("a", "b", "c"))
    keys = load_file(str(tmp_path / "fusion" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.fusion.query.weight" in keys and len(keys) == 2 * 6
    third = PeftModel.from_pretrained(twin(plain), tmp_path / "adapters" / "a", adapter_name="a")
    for name in ("b", "c"):
        third.load_adapter(tmp_path / "adapters" / name, name)
    fused = third.load_adapter_fusion(tmp_path / "fusion", set_active=True)
    assert fused == Fuse("a", "b", "c") and third.active_composition == fused
    assert max_diff(logits(third, inputs), want) == 0.0
    with pytest.raises(ValueError, match="not an adapter fusion"):
        third.load_adapter_fusion(tmp_path / "adapters" / "b")
    with pytest.raises(ValueError, match="already exists"):
        third.add_adapter_fusion(Fuse("a", "b", "c"))
    with pytest.raises(ValueError, match=r"adapter_names: no bottleneck adapter\(s\) \['x'\]"):
        third.add_adapter_fusion(["a", "x"])
    with pytest.raises(ValueError, match="cannot nest Stack"):
        third.set_adapter(Fuse("a", Stack("b", "c")))
    third.delete_adapter("b")  # its fusions go with it
    assert not any(len(w.fusion) for w in third.modules() if isinstance(w, AdapterWrapper))
    assert third.active_composition is None and third.active_adapters == ["a"]


# -- LoRA beside a bottleneck adapter ---------------------------------------------------------------------------------


def lora_delta(layer, name, x):
    return layer.scaling[name] * (x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T)


def lora_and_adapter(adapter_first: bool):
    model = build("llama")
    plain = twin(model)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    acfg = AdapterConfig(bottleneck_size=6, placement="houlsby")
    if adapter_first:
        pm = get_peft_model(model, acfg, "adp")
        pm.add_adapter("lx", lcfg)
    else:
        pm = get_peft_model(model, lcfg, "lx")
        pm.add_adapter("adp", acfg)
    randomize(pm, ("lora_B", "bottleneck"), seed=12)
    return pm, plain


@pytest.mark.parametrize("adapter_first", [False, True])
def test_lora_beside_an_adapter_equals_both_applied(adapter_first, tmp_path):
    pm, plain = lora_and_adapter(adapter_first)
    base = pm.get_base_model()
    layer0 = base.model.layers[0]
    o_proj = layer0.self_attn.o_proj
    assert isinstance(o_proj, AdapterWrapper) and hasattr(o_proj.base_layer, "lora_A")
    assert hasattr(layer0.mlp.base_layer.down_proj, "lora_A")
    inputs = batch(2, 6, seed=9)
    pm.set_adapter(["lx", "adp"])
    assert sorted(pm.active_adapters) == ["adp", "lx"]
    got = logits(pm, inputs)

    # by hand: each LoRA delta on its linear layer's output, then the adapters on the wrapped sublayers' outputs
    handles = []
    for path, m in base.named_modules():
        if hasattr(m, "lora_A") and "lx" in m.lora_A:
            target = plain.get_submodule(path.replace(".base_layer", ""))
            handles.append(target.register_forward_hook(lambda mod, a, out, m=m: out + lora_delta(m, "lx", a[0])))
    for path, w in base.named_modules():
        if isinstance(w, AdapterWrapper):
            target = plain.get_submodule(path)
            handles.append(target.register_forward_hook(lambda mod, a, out, w=w: single(w, "adp", out, out)))
    want = logits(plain, inputs)
    for h in handles:
        h.remove()
    assert max_diff(got, want) < TOL, f"off by {max_diff(got, want):.3e}"

    # each alone, and both train
    pm.set_adapter("lx")
    only_lora = logits(pm, inputs)
    assert max_diff(only_lora, got) > 1e-3
    assert all(".lora_" in n for n in trainable_names(pm))
    pm.set_adapter(["lx", "adp"])
    pm.train()
    trainable = trainable_names(pm)
    assert any(".lora_A.lx." in n for n in trainable) and any(".bottleneck.adp." in n for n in trainable)
    loss = pm(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if p.requires_grad)
    pm.zero_grad()
    pm.eval()

    # files: each method in its own directory, LoRA's keys as without the wrappers
    pm.save_pretrained(tmp_path)
    lora_keys = sorted(load_file(str(tmp_path / "lx" / "adapter_model.safetensors")))
    alone = get_peft_model(twin(plain), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                       "down_proj"]))  # fmt: skip
    assert lora_keys == sorted(alone._file_params("default")), lora_keys[:3]
    adp_keys = sorted(load_file(str(tmp_path / "adp" / "adapter_model.safetensors")))
    assert adp_keys and all(".bottleneck." in k and "lora" not in k for k in adp_keys)
    again = PeftModel.from_pretrained(twin(plain), tmp_path / "adp", adapter_name="adp")
    again.load_adapter(tmp_path / "lx", "lx")
    again.set_adapter(["adp", "lx"])
    assert max_diff(logits(again, inputs), got) == 0.0
    with again.disable_adapter():
        assert max_diff(logits(again, inputs), logits(plain, inputs)) == 0.0
    again.disable_adapter_layers()
    assert max_diff(logits(again, inputs), logits(plain, inputs)) == 0.0
    again.enable_adapter_layers()
    assert max_diff(logits(again, inputs), got) == 0.0
    with pytest.raises(ValueError, match="not applicable"):
        again.merge_and_unload()
    assert max_diff(logits(again.unload(), inputs), logits(plain, inputs)) == 0.0


def test_lora_beside_a_composition():
    pm, plain = lora_and_adapter(adapter_first=False)
    pm.add_adapter("adp2", AdapterConfig(bottleneck_size=3, placement="houlsby"))
    randomize(pm, ("bottleneck.adp2",), seed=13)
    inputs = batch(2, 5, seed=10)
    pm.set_adapter(["lx", Stack("adp", "adp2")])
    assert pm.active_composition == Stack("adp", "adp2")
    got = logits(pm, inputs)
    pm.set_adapter(Stack("adp", "adp2"))
    stacked = logits(pm, inputs)
    pm.set_adapter("lx")
    assert max_diff(got, stacked) > 1e-3 and max_diff(got, logits(pm, inputs)) > 1e-3
    pm.set_adapter(["lx", Stack("adp", "adp2")])
    pm.delete_adapter("lx")
    assert pm.active_composition == Stack("adp", "adp2")
    assert max_diff(logits(pm, inputs), stacked) < TOL


@pytest.mark.skipif(not INTERPRET, reason="FASTPEFT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
def test_blocks_on_the_triton_kernels_match_the_reference(monkeypatch):
    pm, _ = three_adapters("llama")
    pm.add_adapter_fusion(Fuse("b", "c"))
    randomize(pm, ("fusion",), seed=16)
    pm.train()
    inputs = batch(2, 5, seed=17)
    setup = BatchSplit(Stack("a", Fuse("b", "c")), Average("a", "b", weights=[0.3, 0.7]), batch_sizes=[1, 1])
    pm.set_active_adapters(setup)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        pm.zero_grad()
        out = pm(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        results[backend] = (out.logits.detach(), grads)
    (ref_out, ref_grads), (tri_out, tri_grads) = results["reference"], results["triton"]
    assert max_diff(ref_out, tri_out) < 1e-4
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) > 0
    for n in ref_grads:
        assert max_diff(ref_grads[n], tri_grads[n]) < 1e-4, n
