"""ember.swap on every architecture of issue #14, from the real transformers classes with random
weights (the zoo of ``ember.bench.swap``, at a tiny width): what each swap fuses, outputs and gradients
unchanged, the state_dict unchanged (same keys, same storages), ``unswap`` restoring the identical
module objects, and ``torch.compile(fullgraph=True)`` on the swapped model wherever the unswapped one
compiles so."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import ember  # noqa: E402
from ember.bench import swap as zoo  # noqa: E402

TINY = zoo.WIDTHS["tiny"]
# architecture -> {rule: number of modules it replaces}
EXPECTED = {
    "bert": {"hf-linear-act": 2},
    "distilbert": {"hf-up-act": 2},
    "gpt2": {"hf-linear-act": 2, "causal-lm-loss": 1},
    "gpt-neox": {"hf-up-act": 2},
    "gpt-j": {"hf-up-act": 2, "causal-lm-loss": 1},
    "codegen": {"hf-up-act": 2, "causal-lm-loss": 1},
    "opt": {"hf-up-act": 2},
    "falcon": {"hf-up-act": 2},
    "bloom": {"hf-up-act": 2},
    "llama": {"gated-mlp": 2, "causal-lm-loss": 1},
    "mistral": {"gated-mlp": 2, "causal-lm-loss": 1},
    "qwen2": {"gated-mlp": 2, "causal-lm-loss": 1},
    "gemma": {"gated-mlp": 2, "causal-lm-loss": 1},
    "phi3": {"hf-packed-gated": 2, "causal-lm-loss": 1},
    "t5": {"hf-up-act": 4},
    "t5-gated-gelu": {"hf-packed-gated": 4},
    "t5-gated-silu": {"hf-packed-gated": 4},
    "mt5": {"hf-up-act": 4},
    "vit": {"hf-up-act": 2},
    "deit": {"hf-up-act": 2},
    "beit": {"hf-up-act": 2},
    "siglip": {"hf-up-act": 3},  # two encoder layers and the attention-pooling head's MLP
    "clip-text": {"hf-up-act": 2},
    "whisper": {"hf-up-act": 4},
    "mixtral": {"moe-experts": 2},
    "qwen2-moe": {"moe-experts": 2, "gated-mlp": 2},  # the routed experts and the shared expert
    "qwen3-moe": {"moe-experts": 2},
    "deepseek-v3": {"moe-experts": 2, "gated-mlp": 2},
}


def test_every_architecture_has_an_expectation():
    assert set(EXPECTED) == set(zoo.BY_NAME)


def _rules(report) -> dict:
    out = {}
    for r in report.replaced:
        out[r.rule] = out.get(r.rule, 0) + 1
    return out


@pytest.mark.parametrize("name", sorted(zoo.BY_NAME))
def test_outputs_and_gradients_unchanged(name):
    _, _, report, _, rel = zoo.compare(zoo.BY_NAME[name], TINY)  # raises on any difference
    assert _rules(report) == EXPECTED[name], str(report)
    assert rel <= zoo.RTOL


@pytest.mark.parametrize("name", sorted(zoo.BY_NAME))
def test_state_dict_kept_and_unswap_restores_the_same_objects(name):
    model = zoo.build(zoo.BY_NAME[name], TINY)
    mods = dict(model.named_modules(remove_duplicate=False))
    sd = [(k, v.data_ptr(), v.clone()) for k, v in model.state_dict().items()]
    ember.swap(model)
    now = list(model.state_dict().items())
    assert [k for k, _ in now] == [k for k, _, _ in sd]
    for (k, v), (_, ptr, ref) in zip(now, sd):
        assert v.data_ptr() == ptr and torch.equal(v, ref), k
    ember.unswap(model)
    restored = dict(model.named_modules(remove_duplicate=False))
    assert list(restored) == list(mods)
    for n, m in mods.items():
        assert restored[n] is m, n


def test_a_copied_block_shares_nothing_mutable_with_its_original():
    model = zoo.build(zoo.BY_NAME["gpt-neox"], TINY)
    mlp = model.gpt_neox.layers[0].mlp
    ember.swap(model)
    new = model.gpt_neox.layers[0].mlp
    assert new is not mlp and type(new) is type(mlp)
    assert new._modules is not mlp._modules and new._forward_hooks is not mlp._forward_hooks
    assert isinstance(new.dense_h_to_4h, ember.nn.Linear) and type(mlp.dense_h_to_4h) is torch.nn.Linear
    assert new.dense_h_to_4h.weight is mlp.dense_h_to_4h.weight  # the same Parameter, not a copy
    new.register_forward_hook(lambda *a: None)
    assert not mlp._forward_hooks


@pytest.mark.parametrize("name", ["gpt-neox", "opt", "distilbert", "bloom", "phi3", "t5-gated-gelu", "whisper"])
def test_compile_fullgraph_where_eager_compiles(name):
    arch = zoo.BY_NAME[name]
    model = zoo.build(arch, TINY)
    inputs = arch.inputs(TINY, torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    except Exception as err:  # noqa: BLE001 - the unswapped model does not compile fullgraph
        pytest.skip(f"{name} does not compile fullgraph unswapped: {type(err).__name__}")
    with torch.no_grad():
        want = zoo.output_of(model(**inputs))
    ember.swap(model)
    torch._dynamo.reset()
    with torch.no_grad():
        got = zoo.output_of(torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body,reason", [
    ("        h = self.dense_h_to_4h(hidden_states)\n        y = self.act(h)\n        return self.dense_4h_to_h(y) + h\n",
     "does not apply"),
    ("        h = self.dense_h_to_4h(hidden_states)\n        h = self.act(h) * 2\n        return self.dense_4h_to_h(h)\n",
     "does not apply"),
    ("        h = self.act(self.dense_h_to_4h(hidden_states))\n        return self.dense_4h_to_h(h) + self.act(h)\n",
     "used 2 times"),
])
def test_up_act_rule_declines_forwards_that_reuse_the_pre_activation(tmp_path, monkeypatch, body, reason):
    import importlib.util
    import sys

    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP

    # a real module file, so inspect.getsource can read the class, posing as transformers'
    src = tmp_path / "fake_neox.py"
    src.write_text("from torch import nn\n\nclass GPTNeoXMLP(nn.Module):\n    def forward(self, hidden_states):\n" + body)
    spec = importlib.util.spec_from_file_location("transformers.fake_neox", src)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "transformers.fake_neox", mod)
    spec.loader.exec_module(mod)
    real = zoo.build(zoo.BY_NAME["gpt-neox"], TINY).gpt_neox.layers[0].mlp
    assert type(real) is GPTNeoXMLP
    fake = mod.GPTNeoXMLP()
    for k in ("dense_h_to_4h", "act", "dense_4h_to_h"):
        setattr(fake, k, copy.deepcopy(getattr(real, k)))
    holder = torch.nn.ModuleDict({"mlp": fake})
    report = ember.swap(holder)
    assert not [r for r in report.replaced if r.rule == "hf-up-act"]
    assert any(reason in s.reason for s in report.skipped if s.name == "mlp"), str(report)


def test_phi3_packed_gated_mlp_reads_the_halves_without_copying():
    model = zoo.build(zoo.BY_NAME["phi3"], TINY)
    mlp = model.model.layers[0].mlp
    ember.swap(model)
    new = model.model.layers[0].mlp
    assert isinstance(new, ember.nn.PackedGatedMLP) and new.gate_up_proj is mlp.gate_up_proj
    x = torch.randn(3, TINY.hidden, requires_grad=True)
    want = mlp(x)
    got = new(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (gw,) = torch.autograd.grad(want.sum(), mlp.gate_up_proj.weight)
    (gg,) = torch.autograd.grad(got.sum(), new.gate_up_proj.weight)
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(zoo.BY_NAME))
def test_bf16_within_the_flash_attention_rule(name):
    # bf16: the swapped model's error against the fp32 model is at most twice eager bf16's own error
    # (plus a small floor), the rule flash-attention's tests use for a kernel that rounds differently
    arch = zoo.BY_NAME[name]
    ref_model = zoo.build(arch, TINY)
    inputs = arch.inputs(TINY, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = zoo.output_of(ref_model(**inputs)).float()
        eager = copy.deepcopy(ref_model).to(torch.bfloat16)
        swapped = copy.deepcopy(eager)
        ember.swap(swapped)
        bf_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        want = zoo.output_of(eager(**bf_inputs)).float()
        got = zoo.output_of(swapped(**bf_inputs)).float()
    eager_err = (want - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 2 * eager_err + 1e-2 * ref.abs().max().item(), (err, eager_err)


@pytest.mark.parametrize("change,reason", [
    (lambda ex: setattr(ex, "_is_expert_parallel", True), "_is_expert_parallel=True"),
    (lambda ex: setattr(ex, "has_bias", True), "has_bias=True"),
    (lambda ex: setattr(ex.config, "_experts_implementation", "sonicmoe"), "'sonicmoe' experts kernel"),
    (lambda ex: setattr(ex, "extra", torch.nn.Parameter(torch.zeros(1))), "not exactly gate_up_proj"),
    (lambda ex: ex.register_forward_hook(lambda *a: None), "hooks"),
])
def test_moe_rule_declines_experts_it_does_not_know(change, reason):
    model = zoo.build(zoo.BY_NAME["mixtral"], TINY)
    experts = model.model.layers[0].mlp.experts
    change(experts)
    report = ember.swap(model)
    assert model.model.layers[0].mlp.experts is experts
    assert any(reason in s.reason for s in report.skipped if s.name.endswith("layers.0.mlp.experts")), str(report)
    assert type(model.model.layers[1].mlp.experts).__name__ == ("MixtralExperts" if "sonicmoe" in reason
                                                                 else "GatedExperts")


def test_every_listed_experts_class_is_the_known_forward():
    """The MoE rule's class list: each class the installed transformers has must still be the known
    per-expert loop (else the rule declines it, and the list is stale)."""
    import importlib
    import pkgutil

    import transformers.models as models

    from ember.swap import gated

    found = {}
    for info in pkgutil.iter_modules(models.__path__):
        try:
            mod = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # noqa: BLE001 - a model whose module needs an optional package
            continue
        for name in gated.MOE_EXPERTS_CLASSES & set(vars(mod)):
            found[name] = gated._experts_forward_problem(getattr(mod, name))
    assert {"MixtralExperts", "Qwen2MoeExperts", "DeepseekV3Experts"} <= set(found)
    assert {n: p for n, p in found.items() if p is not None} == {}


def test_moe_rule_says_why_it_leaves_other_experts():
    tf = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = tf.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=2, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    holder = torch.nn.ModuleDict({"experts": GptOssExperts(cfg)})
    report = ember.swap(holder)
    assert type(holder["experts"]) is GptOssExperts
    assert any("other math" in s.reason for s in report.skipped if s.name == "experts"), str(report)
