"""Configs and adapter files: refused options, unknown keys, missing / truncated / mismatched files, atomic saves."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import batch, build, max_diff

from fastpeft import AdapterConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from fastpeft.peft import config_from_dict, io


@pytest.mark.parametrize(
    ("option", "value"),
    [("layer_replication", [[0, 1]]), ("use_qalora", True), ("layers_pattern", "layers"),
     ("init_lora_weights", "loftq"), ("init_lora_weights", "corda"), ("init_lora_weights", "eva")],
)  # fmt: skip
def test_unsupported_lora_option_is_named(option, value):
    with pytest.raises(ValueError, match=option):
        LoraConfig(**{option: value})
    with pytest.raises(ValueError, match=option):
        config_from_dict({**LoraConfig().to_dict(), option: value})


def test_hf_configs_round_trip_and_bookkeeping_keys():
    for hf_cfg, ours_cls in [
        (peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1), LoraConfig),
        (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), PromptTuningConfig),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), PrefixTuningConfig),
    ]:
        data = json.loads(json.dumps(hf_cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        data["peft_type"] = hf_cfg.peft_type.value
        if data.get("task_type") is not None:
            data["task_type"] = str(getattr(hf_cfg.task_type, "value", hf_cfg.task_type))
        ours = config_from_dict(data)
        assert isinstance(ours, ours_cls)
        for key, value in ours.to_dict().items():
            if key in data and key != "peft_type":
                want = data[key]
                assert value == want or (isinstance(want, list) and sorted(value) == sorted(want)), key
    assert LoraConfig(layers_to_transform=[], rank_pattern=None).r == 8  # empty means unused, as in peft
    assert config_from_dict({**LoraConfig().to_dict(), "loftq_config": None, "eva_config": {}}).r == 8
    with pytest.raises(ValueError, match="velora_config"):
        config_from_dict({**LoraConfig().to_dict(), "velora_config": {"x": 1}})
    with pytest.warns(UserWarning, match="ignoring keys.*frobnicate"):  # HF PEFT's rule: a newer file loads
        assert config_from_dict({**LoraConfig().to_dict(), "frobnicate": 1}).r == 8
    with pytest.raises(ValueError, match="peft_type"):
        config_from_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")
    assert config_from_dict(AdapterConfig(placement="parallel").to_dict()).placement == "parallel"


def _saved(tmp_path):
    pm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    return pm


def test_missing_files_are_named(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "moved")
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors.*pickle"):
        PeftModel.from_pretrained(build("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "nowhere")


def test_truncated_file_is_named(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*truncated"):
        PeftModel.from_pretrained(build("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    bad = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[bad] = torch.randn(3, 32)
    tensors["base_model.model.extra.lora_A.weight"] = torch.randn(2, 2)
    save_file(tensors, str(path), metadata={"format": "pt"})
    victim = build("llama")
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(victim, tmp_path)
    assert not any("lora" in n for n, _ in victim.named_modules()), "a failed load left LoRA layers behind"
    msg = str(info.value)
    assert str(path) in msg and gone in msg and "extra.lora_A" in msg and f"{bad}: file (3, 32) vs model (4, 32)" in msg
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    pm = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before, f"an interrupted save changed the directory: {sorted(after)} vs {sorted(before)}"
    monkeypatch.undo()
    pm.save_pretrained(tmp_path)
    inputs = batch()
    again = PeftModel.from_pretrained(build("llama"), tmp_path)
    with torch.no_grad():
        assert max_diff(again(**inputs).logits, pm(**inputs).logits) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, f"file modes {modes}"


def test_crash_between_the_two_moves_is_named_on_load(tmp_path, monkeypatch):
    pm = _saved(tmp_path)
    old_config = (tmp_path / "adapter_config.json").read_bytes()
    pm.peft_config["default"].lora_alpha = 7  # a new config, same tensor shapes
    moves, real_replace = [], os.replace

    def replace_then_crash(src, dst):
        if moves:
            raise OSError("power lost")
        moves.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="power lost"):
        pm.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert [p.name for p in moves] == ["adapter_model.safetensors"]
    assert (tmp_path / "adapter_config.json").read_bytes() == old_config  # new weights, old config
    with pytest.warns(UserWarning, match=r"saved with a different adapter_config.json: lora_alpha \(saved 7, now 8\)"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_hand_edited_bookkeeping_loads_without_warning(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"], cfg["inference_mode"] = "/elsewhere/model", False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_print_trainable_parameters(capsys):
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.print_trainable_parameters()
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * (32 + 32)
    line = capsys.readouterr().out.strip()
    assert (
        line
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


# -- hardening: names, values, sizes and arbitrary config files ---------------------------------------

_PROMPT = dict(task_type="CAUSAL_LM", num_virtual_tokens=2)
_BAD_NAMES = ["ABS", "..", "a/b", "a.b", "", "x y", "keys", "training"]  # ABS: an absolute path under tmp_path


@pytest.mark.parametrize("name", _BAD_NAMES)
def test_bad_adapter_names_are_refused_where_they_enter(tmp_path, name):
    if name == "ABS":
        name = str(tmp_path / "elsewhere")
    saved = tmp_path / "saved"
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(saved)
    cases = {
        "add_adapter": lambda: pm.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"])),
        "load_adapter": lambda: pm.load_adapter(saved, name),
        "from_pretrained": lambda: PeftModel.from_pretrained(build("llama"), saved, adapter_name=name),
        "get_peft_model": lambda: get_peft_model(build("llama"), PromptTuningConfig(**_PROMPT), adapter_name=name),
    }
    for how, call in cases.items():
        with pytest.raises(ValueError, match="adapter name"):
            call()
        assert list(pm.peft_config) == ["default"], f"{how} left an adapter behind"
    pm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "elsewhere").exists(), "an adapter was written outside the output folder"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_peft_prefix_rule_applies_to_lora_names_only():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    for name in ("lora", "ora_", "a"):  # HF PEFT warns that names inside "lora_" mis-load
        with pytest.raises(ValueError, match="prefix 'lora_'"):
            pm.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("lora-2", LoraConfig(r=2, target_modules=["q_proj"]))
    prompt = get_peft_model(build("llama"), PromptTuningConfig(**_PROMPT), adapter_name="lora")
    assert list(prompt.peft_config) == ["lora"]


def test_non_finite_mistyped_and_malformed_values_are_named(tmp_path):
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            LoraConfig(lora_alpha=alpha)
    with pytest.raises(TypeError, match="lora_alpha must be a finite number, got 'x'"):
        LoraConfig(lora_alpha="x")
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        AdapterConfig(scaling=float("nan"))
    with pytest.raises(ValueError, match=r"target_modules='q_proj\(' is not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match="exclude_modules"):
        LoraConfig(target_modules=["q_proj"], exclude_modules="[")
    _saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    good = json.loads(path.read_text())
    for text, match in [
        (json.dumps({**good, "lora_alpha": "x"}), "lora_alpha must be a finite number, got 'x'"),
        (json.dumps({**good, "lora_alpha": float("nan")}), "lora_alpha"),
        (json.dumps({**good, "target_modules": "q_proj("}), "not a valid regular expression"),
        (json.dumps({**good, "use_rslora": "yes"}), "use_rslora must be true or false"),
        (json.dumps({**good, "peft_type": ["LORA"]}), "peft_type"),
        (json.dumps({**good, "target_modules": ["nothing_here"]}), "matched no module"),
        ("[1]", "expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ]:
        path.write_text(text)
        victim = build("llama")
        with pytest.raises(ValueError, match=match) as info:
            PeftModel.from_pretrained(victim, tmp_path)
        assert str(path) in str(info.value), f"the file is not named: {info.value}"
        assert not any("lora" in n for n, _ in victim.named_modules()), "a failed load left LoRA layers behind"


def test_oversized_adapters_fail_before_allocating():
    victim = build("llama")
    before = {n: type(m) for n, m in victim.named_modules()}
    with pytest.raises(ValueError, match=r"LoRA with r=1000000000 on 2 layers needs .* GiB, more than"):
        get_peft_model(victim, LoraConfig(r=10**9, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="bottleneck adapters of size 1000000000 needs"):
        get_peft_model(victim, AdapterConfig(bottleneck_size=10**9))
    for cls in (PromptTuningConfig, PrefixTuningConfig):
        with pytest.raises(ValueError, match=r"num_virtual_tokens=100000 leaves no room in the model's 2048 positions"):
            get_peft_model(victim, cls(task_type="CAUSAL_LM", num_virtual_tokens=100_000))
    assert {n: type(m) for n, m in victim.named_modules()} == before, "a refusal changed the model"


def test_a_failed_injection_halfway_leaves_the_model_as_it_was():
    victim = build("llama")
    pm = get_peft_model(victim, AdapterConfig(bottleneck_size=4, placement="parallel"))
    before = {n: type(m) for n, m in victim.named_modules()}
    with pytest.raises(ValueError, match="already holds a parallel adapter"):
        pm.add_adapter("houlsby", AdapterConfig(bottleneck_size=4, placement="houlsby"))  # fails after wrapping o_proj
    assert list(pm.peft_config) == ["default"]
    after = {n: type(m) for n, m in victim.named_modules()}
    assert after == before, f"the failed adapter left modules behind: {sorted(after.keys() - before.keys())}"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_GOOD_CONFIGS = {
    "lora": LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "adapter": AdapterConfig(bottleneck_size=4),
    "prompt": PromptTuningConfig(**_PROMPT),
    "prefix": PrefixTuningConfig(**_PROMPT),
}


@st.composite
def _config_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A saved adapter's kind and its adapter_config.json: the saved one with a few keys changed, dropped or
    added, or broken text."""
    kind = draw(st.sampled_from(sorted(_GOOD_CONFIGS)))
    cfg = _GOOD_CONFIGS[kind].to_dict() | {"inference_mode": True}
    keys = sorted(cfg) + ["peft_version", "frobnicate"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        if draw(st.booleans()):
            cfg[key] = draw(_JSON_VALUES)
        else:
            cfg.pop(key, None)
    text = json.dumps(cfg).encode()
    form = draw(st.sampled_from(["config", "config", "config", "cut", "bytes", "value"]))
    if form == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif form == "bytes":
        text = draw(st.binary(max_size=40))
    elif form == "value":
        text = json.dumps(draw(_JSON_VALUES)).encode()
    return kind, text


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """One saved adapter directory per kind, and a base model per kind to load them onto (reused)."""
    root = tmp_path_factory.mktemp("adapters")
    dirs, models = {}, {}
    for kind, config in _GOOD_CONFIGS.items():
        dirs[kind] = root / kind
        get_peft_model(build("llama"), copy.deepcopy(config)).save_pretrained(dirs[kind])
        models[kind] = build("llama")
    return dirs, models


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_config_files())
def test_property_any_adapter_config_loads_or_is_a_named_value_error(saved_adapters, tmp_path, case):
    dirs, models = saved_adapters
    kind, text = case
    directory = tmp_path / f"case-{kind}"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_bytes(text)
    (directory / "adapter_model.safetensors").write_bytes((dirs[kind] / "adapter_model.safetensors").read_bytes())
    model = models[kind]
    before = {n: type(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weights' metadata records the saved config: edits are named
        try:
            loaded = PeftModel.from_pretrained(model, directory)
        except ValueError as e:
            event("refused")
            assert str(directory) in str(e), f"the message does not name the adapter's file: {e}"
        else:
            event("loaded")
            loaded.unload()
    assert {n: type(m) for n, m in model.named_modules()} == before, "the model was left changed"
