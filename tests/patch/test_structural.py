"""patch_model beyond the table: unknown architectures (by structure, probe-verified), PEFT/LoRA
wrappers, torch.compile, accelerate-style hooks and the attention implementation's fallbacks."""

import copy
import importlib.util
import warnings

import pytest
import torch
import transformers
from torch import nn

from metalcore.patch import patch_model, unpatch_model
from metalcore.patch.attention import metalcore_attention_forward




VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_tiny(cls_name, **overrides):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = getattr(transformers, cls_name)(**{**COMMON, **overrides})
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_unknown_type_starcoder2_by_structure():
    """Starcoder2 (not in the table): LayerNorm with bias and a plain c_fc/act/c_proj MLP; its
    attention uses the standard rotate_half RoPE."""
    model = hf_tiny("Starcoder2Config", hidden_act="gelu_pytorch_tanh")
    ids = torch.randint(3, VOCAB, (2, 13))
    ref = model(ids).logits
    report = patch_model(model)
    assert "starcoder2" in report.skipped["model_type"]
    counts = report.counts()
    assert counts["gelu"] == 2 and counts["rope"] == 2 and counts["attention"] == 1
    assert counts["rms_norm"] == 0  # LayerNorm (with bias) is not an RMSNorm
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_unknown_type_cohere_declines_what_differs():
    """Cohere (not in the table): its LayerNorm has weight + variance_epsilon and no bias, so it looks
    like an RMSNorm but subtracts the mean, and its RoPE is interleaved: the probes decline both."""
    model = hf_tiny("CohereConfig")
    ids = torch.randint(3, VOCAB, (2, 13))
    ref = model(ids).logits
    report = patch_model(model)
    counts = report.counts()
    assert counts["rms_norm"] == 0 and counts["rope"] == 0
    assert counts["swiglu_mlp"] == 2 and counts["attention"] == 1
    norm_reasons = [r for p, r in report.skipped.items() if p.endswith("input_layernorm")]
    assert len(norm_reasons) == 2 and all("does not compute" in r for r in norm_reasons)
    assert sum("not the rotate_half RoPE" in r for r in report.skipped.values()) == 2
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)


class ToyRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class ToyNoBiasLayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.eps = 1e-5

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


class ToyMLP(nn.Module):
    def __init__(self, n, m, swapped=False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(n, m), nn.Linear(n, m), nn.Linear(m, n)
        self.act_fn = nn.SiLU()
        self.swapped = swapped

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(u) * g if self.swapped else self.act_fn(g) * u)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre_norm = ToyRMSNorm(32)
        self.mid_norm = ToyNoBiasLayerNorm(32)
        self.mlp = ToyMLP(32, 48)
        self.odd_mlp = ToyMLP(32, 48, swapped=True)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 8))

    def forward(self, x):
        return self.head(self.odd_mlp(self.mlp(self.mid_norm(self.pre_norm(x)))))


def test_plain_module_by_structure():
    model = Toy()
    x = torch.randn(3, 5, 32)
    ref = model(x)
    report = patch_model(model)
    assert report.swapped == {"pre_norm": ["rms_norm(offset=1)"], "mlp": ["swiglu_mlp"], "head.1": ["gelu(tanh)"],
                              "": ["norm_recompute"]}  # the norm's parent
    assert "does not compute x/rms(x)" in report.skipped["mid_norm"]
    assert "down(silu(gate(x))·up(x))" in report.skipped["odd_mlp"]
    assert "PreTrainedModel" in report.skipped["attention"]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    unpatch_model(model)
    assert torch.equal(model(x), ref)


def test_structural_off_patches_only_the_table():
    """Activation modules are recognised by type, not structure: they are still swapped."""
    report = patch_model(Toy(), structural=False)
    assert set(report.counts()) == {"silu", "gelu"}


def test_torch_compile_after_patch(ran_ops):
    model = hf_tiny("LlamaConfig")
    ids = torch.randint(3, VOCAB, (2, 11))
    patch_model(model)
    eager_logits = model(ids).logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    ran_ops.clear()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager_logits, rtol=1e-5, atol=1e-6)
    # The compiled graph calls metalcore's ops, not the transformers functions they replaced.
    assert {"rope_fwd", "rms_norm_fwd", "swiglu_fwd", "sdpa_fwd"} <= ran_ops
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # patch_model on the compiled wrapper reaches the same model and the same report.
    assert patch_model(compiled) is patch_model(model)


def test_accelerate_style_hook_is_kept():
    """An instance forward installed by accelerate (module._old_forward + _hf_hook) keeps wrapping ours."""
    model = hf_tiny("LlamaConfig")
    norm = model.model.norm
    calls = []
    norm._hf_hook = object()
    norm._old_forward = norm.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return norm._old_forward(*args, **kwargs)

    norm.forward = hooked
    report = patch_model(model)
    assert "model.norm" in report.swapped and norm.forward is hooked
    model(torch.randint(3, VOCAB, (1, 5)))
    assert calls and norm._old_forward.kind == "rms_norm"
    unpatch_model(model)
    assert norm.forward is hooked and norm._old_forward.__func__ is type(norm).forward


def test_foreign_instance_forward_is_left_alone():
    model = hf_tiny("LlamaConfig")
    model.model.norm.forward = lambda x: x
    report = patch_model(model)
    assert "own forward" in report.skipped["model.norm"]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_peft_lora_model_patches_the_base_model():
    import peft

    base = hf_tiny("LlamaConfig")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    plain = copy.deepcopy(lora)
    ids = torch.randint(3, VOCAB, (2, 9))
    report = patch_model(lora)
    assert report.counts()["rms_norm"] == 5 and report.counts()["swiglu_mlp"] == 2 and report.counts()["rope"] == 2
    assert "base_model" not in next(iter(report.swapped))  # paths are the HF model's
    out, ref = lora(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    trained = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    ref_grads = dict(plain.named_parameters())
    for name, p in trained:
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6)
    assert patch_model(lora) is report
    unpatch_model(lora)
    assert torch.equal(lora(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_padding_mask_is_honoured():
    """Left-padded batch: every real token's logits match sdpa's; the sdpa_mask path is exercised."""
    model = hf_tiny("MistralConfig", sliding_window=4)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ref = model(ids, attention_mask=mask).logits
    patch_model(model)
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-5)


def test_attention_function_matches_sdpa_and_falls_back_loudly(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        out, weights = metalcore_attention_forward(module, q, k, v, m, scaling=0.3)
        ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
        assert weights is None and out.shape == (2, 6, 4, 8) and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # Today every input sdpa takes, the metalcore op takes too; the fallback guards future dtypes.
    from metalcore.patch import attention

    monkeypatch.setattr(attention, "_unservable", lambda query, mask: "dtype X is not served")
    with pytest.warns(UserWarning, match="dtype X is not served; this call runs transformers' sdpa"):
        out, _ = metalcore_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0])
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metalcore_attention_forward(module, q, k, v, None)


class ClampingNorm(nn.Module):
    """An RMSNorm look-alike that clamps its input: equal to x/rms(x)·w for ordinary activations only."""

    def __init__(self, n, limit=100.0, rms_floor=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.eps, self.limit, self.rms_floor = 1e-6, limit, rms_floor

    def forward(self, x):
        x = x.clamp(-self.limit, self.limit)
        rms = torch.sqrt(x.square().mean(-1, keepdim=True) + self.eps).clamp_min(self.rms_floor)
        return self.weight * (x / rms)


@pytest.mark.parametrize("limit,rms_floor", [(100.0, 0.0), (1e5, 0.0), (float("inf"), 1e-2)],
                         ids=["clamp100", "clamp1e5", "rms-floor"])
def test_structural_probe_reaches_the_tails(limit, rms_floor):
    """The probe feeds rows from 1e-6 to 1e6 in magnitude: a norm that clamps there is not swapped."""
    model = nn.Sequential(ClampingNorm(32, limit, rms_floor))
    report = patch_model(model)
    assert "0" not in report.swapped and "does not compute x/rms(x)" in report.skipped["0"]
    plain = nn.Sequential(ClampingNorm(32, float("inf"), 0.0))
    assert patch_model(plain).swapped == {"0": ["rms_norm"], "": ["norm_recompute"]}
