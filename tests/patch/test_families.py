"""patch_model on every family of the table: a tiny random model per family (2 layers, hidden 64,
vocab 128, GQA 4:2, sequences longer than the sliding windows), patched against unpatched.

Numerics follow the suite's relative rule (tests/tolerances.py): against the model run in float64,
the patched model's error (logits, and every parameter's gradient) may be at most
TORCH_ERROR_FACTOR times the unpatched model's error in the same dtype, plus ABS_FLOOR of that dtype.
Errors are Frobenius norms; the floor is relative to the logits' norm, and for gradients to the norm
of *all* gradients: a bias gradient is a sum over tokens with heavy cancellation, so its error
relative to its own (small) norm is rounding noise that varies 2-3x between seeds for torch and
metalcore alike (measured: GLM q/k biases at fp32), while the whole-model ratios stay at 0.9-1.1.
"""

import copy

import pytest
import torch
import transformers
from tolerances import ABS_FLOOR, TORCH_ERROR_FACTOR

from metalcore.patch import FAMILIES, patch_model, patch_report, unpatch_model

VOCAB, SEQ = 128, 19
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

# model_type -> (config class, overrides). Sliding windows (8) are shorter than SEQ so that they bite.
CASES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "ministral": ("MinistralConfig", dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"])),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         mlp_only_layers=[0])),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5)),
    "glm": ("GlmConfig", dict(head_dim=16)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "granite": ("GraniteConfig", dict(attention_multiplier=0.25, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      logits_scaling=2.0)),
    "helium": ("HeliumConfig", dict(head_dim=16)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),
}


def tiny_model(model_type: str, dtype=torch.float32) -> transformers.PreTrainedModel:
    cls_name, overrides = CASES[model_type]
    config = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    config._experts_implementation = "eager"  # grouped_mm has no float64 (the oracle) on the CPU
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        # Random norm weights (HF initialises them to 1 or 0), so that a wrong offset or weight shows.
        for name, p in model.named_parameters():
            if p.dim() == 1:
                torch.nn.init.normal_(p, 0.0 if "norm" not in name or config.model_type.startswith("gemma") else 1.0,
                                      0.3)
    return model.to(dtype).eval()



def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).norm().item()


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


FAMILY_IDS = sorted(CASES)


def test_every_table_family_has_a_case():
    assert set(FAMILY_IDS) == set(FAMILIES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_logits_and_gradients_match(model_type, dtype, ran_ops):
    oracle = tiny_model(model_type, torch.float64)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    ref_logits, ref_grads = _run(oracle, ids, ids)
    plain = copy.deepcopy(oracle).to(dtype)
    patched = copy.deepcopy(oracle).to(dtype)
    report = patch_model(patched)
    torch_logits, torch_grads = _run(plain, ids, ids)
    ran_ops.clear()
    metal_logits, metal_grads = _run(patched, ids, ids)

    floor = ABS_FLOOR[dtype]
    e_metal, e_torch = _err(metal_logits, ref_logits), _err(torch_logits, ref_logits)
    assert e_metal <= TORCH_ERROR_FACTOR * e_torch + floor * ref_logits.norm(), \
        f"logits: metalcore {e_metal:.2e} vs torch {e_torch:.2e}"
    assert metal_grads.keys() == torch_grads.keys() == ref_grads.keys()
    grad_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    for name, ref in ref_grads.items():
        e_metal, e_torch = _err(metal_grads[name], ref), _err(torch_grads[name], ref)
        assert e_metal <= TORCH_ERROR_FACTOR * e_torch + floor * grad_norm, \
            f"grad {name}: metalcore {e_metal:.2e} vs torch {e_torch:.2e}"

    # The kernels really ran (not a silently unpatched model).
    counts = report.counts()
    expected_ops = {"rms_norm": "rms_norm_fwd", "swiglu_mlp": "swiglu_fwd",
                    "fused_swiglu_mlp": "swiglu_fwd", "rope": "rope_fwd",
                    "attention": "sdpa_fwd", "gelu": "gelu_fwd"}
    for kind, op in expected_ops.items():
        if counts[kind]:
            assert op in ran_ops, f"{kind} was reported swapped but {op} never ran"


def _count(model, class_names):
    return sum(type(m).__name__ in class_names for m in model.modules())


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_report_lists_the_swaps(model_type):
    model = tiny_model(model_type)
    fam = FAMILIES[model_type]
    report = patch_model(model)
    counts = report.counts()
    assert report.model_type == model_type and report.active
    assert counts["rms_norm"] == _count(model, fam.norm_classes) > 0
    mlps = _count(model, fam.mlp_classes)
    if model_type.startswith("gemma"):  # GeGLU: the activation is swapped, the gate stays unfused
        assert counts["gelu"] == mlps > 0
    else:
        assert counts["swiglu_mlp"] + counts["fused_swiglu_mlp"] == mlps
    attn_layers = _count(model, fam.attention_classes)
    if fam.rope is None:
        assert counts["rope"] == 0 and sum("RoPE" in why for why in report.skipped.values()) == attn_layers
    else:
        assert counts["rope"] == attn_layers > 0  # SmolLM3's NoPE layers too: their forward skips the call
    if fam.attention_blocker and fam.attention_blocker(model.config):
        assert "soft-capping" in report.skipped["attention"] and model.config._attn_implementation != "metalcore"
    else:
        assert counts["attention"] == 1 and model.config._attn_implementation == "metalcore"
        assert report.attn_implementation == ("sdpa", "metalcore")
    assert "model_type" not in report.skipped
    assert model_type in str(report)


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_greedy_generate_same_tokens(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding in the second row
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    patch_model(model)
    assert torch.equal(model.generate(ids, **kwargs), expected)


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_unpatch_restores_bit_exactly(model_type, ran_ops):
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    before = model(ids).logits
    impl = model.config._attn_implementation
    types_before = [type(m) for m in model.modules()]
    report = patch_model(model)
    model(ids)
    assert ran_ops, "the patched model ran no metalcore op"
    assert unpatch_model(model) is report and not report.active
    ran_ops.clear()
    assert torch.equal(model(ids).logits, before)
    assert not ran_ops, f"metalcore ops still ran after unpatch: {sorted(ran_ops)}"
    assert model.config._attn_implementation == impl
    assert [type(m) for m in model.modules()] == types_before
    assert not any("forward" in m.__dict__ or "_metalcore_spec" in m.__dict__ for m in model.modules())
    assert patch_report(model) is None and unpatch_model(model) is None


def test_patch_is_idempotent():
    model = tiny_model("llama")
    first = patch_model(model)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    assert patch_model(model) is first
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert first.counts()["rms_norm"] == 5 and not first.skipped
    # Other options: the old patch is undone, the new one applied once.
    second = patch_model(model, attention=False)
    assert not first.active and second.active and second.counts()["attention"] == 0
    assert model.config._attn_implementation == "sdpa"
    assert second.counts()["rms_norm"] == 5


def test_options_switch_swaps_off():
    model = tiny_model("llama")
    report = patch_model(model, rms_norm=False, activations=False, rope=False, cross_entropy=False)
    assert set(report.counts()) == {"attention"}


def test_gemma2_softcapping_keeps_eager_and_says_why():
    model = tiny_model("gemma2")
    before = model.config._attn_implementation
    report = patch_model(model)
    assert model.config._attn_implementation == before
    assert "attn_logit_softcapping" in report.skipped["attention"]
    assert "soft-capping" in str(report)


def test_attention_refuses_softcap_rather_than_ignore_it():
    from metalcore.patch.attention import metalcore_attention_forward

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        metalcore_attention_forward(torch.nn.Module(), q, q, q, None, softcap=50.0)


def _metalcore_forwards(model):
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    """A reference or EMA copy (DPO, RLHF): unpatching the copy leaves the original patched, with
    its report still active, and the copy comes back to the unpatched model exactly."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, SEQ))
    before = model(ids).logits
    report = patch_model(model)
    patched_logits = model(ids).logits
    swapped = _metalcore_forwards(model)
    twin = copy.deepcopy(model)
    twin_report = patch_report(twin)
    assert twin_report is not report and twin_report.active and twin_report.swapped == report.swapped
    # The copy's swapped forwards run on the copy's own modules and weights.
    with torch.no_grad():
        twin.model.norm.weight.mul_(2.0)
    assert not torch.equal(twin(ids).logits, patched_logits)
    assert torch.equal(model(ids).logits, patched_logits)

    assert unpatch_model(twin) is twin_report and not twin_report.active
    assert _metalcore_forwards(twin) == [] and twin.config._attn_implementation == "sdpa"
    assert report.active and patch_report(model) is report
    assert _metalcore_forwards(model) == swapped and model.config._attn_implementation == "metalcore"
    with torch.no_grad():
        twin.model.norm.weight.mul_(0.5)
    assert torch.equal(twin(ids).logits, before)
    unpatch_model(model)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma3_text"])
def test_patched_model_saves_and_loads_whole(model_type, tmp_path):
    """torch.save(model) of a patched model (no closures to pickle); the loaded model is patched,
    gives the same logits, and unpatches to the unpatched model."""
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    before = model(ids).logits
    report = patch_model(model)
    patched_logits = model(ids).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert patch_report(loaded).swapped == report.swapped and patch_report(loaded).active
    assert torch.equal(loaded(ids).logits, patched_logits)
    unpatch_model(loaded)
    assert _metalcore_forwards(loaded) == [] and torch.equal(loaded(ids).logits, before)
    assert report.active


def test_cpu_runs_the_modules_own_code(ran_ops):
    """Automatic choice on the CPU: every swap measured slower than the module's own code, so the patched
    model runs that code (attention: transformers' sdpa) — bit-identical to the unpatched model, no
    metalcore op — and the report says so."""
    import metalcore

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, SEQ))
    with metalcore.use_backend("auto"):
        logits, grads = _run(model, ids, ids)
        report = patch_model(model)
        ran_ops.clear()
        patched_logits, patched_grads = _run(model, ids, ids)
    assert report.counts()["rms_norm"] == 5 and not ran_ops
    assert torch.equal(patched_logits, logits)
    assert all(torch.equal(patched_grads[name], g) for name, g in grads.items())
    assert "on cpu: swapped modules run their own forward and attention runs transformers' sdpa" in str(report)
