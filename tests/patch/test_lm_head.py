"""patch_model's causal-LM head: in training with labels the loss comes from the fused linear
cross-entropy (no logits), everything else is the model's own forward.

Tiny models of tests/patch/test_families.py. Gradients follow the suite's relative rule against the
model run in float64 (see that file's docstring for the floor relative to all gradients' norm).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from tolerances import ABS_FLOOR, TORCH_ERROR_FACTOR

from metalcore.patch import patch_model, patch_report, unpatch_model

# The tiny models of every table family (tests/patch has no package to import them through).
_spec = importlib.util.spec_from_file_location("patch_families_cases", Path(__file__).with_name("test_families.py"))
_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_families)
CASES, COMMON, FAMILY_IDS, SEQ, VOCAB = (_families.CASES, _families.COMMON, _families.FAMILY_IDS, _families.SEQ,
                                         _families.VOCAB)
tiny_model = _families.tiny_model

HEAD_ONLY = dict(rms_norm=False, activations=False, rope=False, attention=False)


def batch(seq=SEQ):
    ids = torch.randint(3, VOCAB, (2, seq))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt, as in supervised fine-tuning
    return ids, labels


def step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _err(x, ref):
    return (x.double() - ref.double()).norm().item()


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_training_loss_and_gradients_match(model_type):
    oracle = tiny_model(model_type, torch.float64).train()
    plain = copy.deepcopy(oracle).float()
    patched = copy.deepcopy(oracle).float()
    report = patch_model(patched, **HEAD_ONLY)
    assert report.counts()["fused_linear_cross_entropy"] == 1, report
    ids, labels = batch()
    ref_out, ref_grads = step(oracle, ids, labels)
    torch_out, torch_grads = step(plain, ids, labels)
    out, grads = step(patched, ids, labels)
    assert out.logits is None and torch_out.logits is not None
    assert out.loss.dtype == torch_out.loss.dtype == torch.float32
    floor = ABS_FLOOR[torch.float32]
    e, t = _err(out.loss, ref_out.loss), _err(torch_out.loss, ref_out.loss)
    assert e <= TORCH_ERROR_FACTOR * t + floor * ref_out.loss.abs().item(), f"loss {e:.2e} vs torch {t:.2e}"
    assert grads.keys() == torch_grads.keys() == ref_grads.keys()
    grad_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    for name, ref in ref_grads.items():
        e, t = _err(grads[name], ref), _err(torch_grads[name], ref)
        assert e <= TORCH_ERROR_FACTOR * t + floor * grad_norm, f"grad {name}: {e:.2e} vs torch {t:.2e}"


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_twenty_training_steps_follow_the_unpatched_curve(model_type):
    """The whole patch (norms, MLPs, RoPE, attention, loss head) trains as the unpatched model does:
    AdamW over 20 steps on fresh batches, half of them with Hugging Face's num_items_in_batch."""
    plain = tiny_model(model_type).train()
    patched = copy.deepcopy(plain)
    report = patch_model(patched)
    assert report.counts()["fused_linear_cross_entropy"] == 1
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, patched)]
    batches = [batch() for _ in range(2)]
    curves = ([], [])
    for i in range(20):
        ids, labels = batches[i % 2]
        kwargs = dict(num_items_in_batch=torch.tensor(25)) if i % 4 == 1 else {}
        for model, opt, curve in zip((plain, patched), opts, curves):
            out, _ = step(model, ids, labels, **kwargs)
            opt.step()
            curve.append(out.loss.item())
    plain_curve, patched_curve = torch.tensor(curves[0]), torch.tensor(curves[1])
    assert plain_curve[-2] < 0.8 * plain_curve[0], "the model did not learn: the test would show nothing"
    torch.testing.assert_close(patched_curve, plain_curve, rtol=2e-4, atol=0.0)


def test_num_items_in_batch_and_shift_labels():
    plain = tiny_model("llama").train()
    patched = copy.deepcopy(plain)
    patch_model(patched, **HEAD_ONLY)
    ids, labels = batch()
    count = torch.tensor(11)
    torch.testing.assert_close(patched(input_ids=ids, labels=labels, num_items_in_batch=count).loss,
                               plain(input_ids=ids, labels=labels, num_items_in_batch=count).loss)
    shift = torch.randint(0, VOCAB, ids.shape)
    torch.testing.assert_close(patched(input_ids=ids, labels=labels, shift_labels=shift).loss,
                               plain(input_ids=ids, labels=labels, shift_labels=shift).loss)


def test_logits_on_request_in_evaluation_and_without_labels():
    model = tiny_model("llama").train()
    ids, labels = batch()
    expected = model(input_ids=ids, labels=labels)
    patch_model(model, **HEAD_ONLY)
    asked = model(input_ids=ids, labels=labels, return_logits=True)
    assert torch.equal(asked.logits, expected.logits) and torch.equal(asked.loss, expected.loss)
    assert torch.equal(model(ids).logits, expected.logits)  # no labels: the class forward
    fused = model(ids, labels=labels, return_dict=False)  # positional input_ids, tuple output
    assert isinstance(fused, tuple) and len(fused) == len(expected.to_tuple()) - 1  # all but the logits
    torch.testing.assert_close(fused[0], expected.loss)
    model.eval()
    assert torch.equal(model(input_ids=ids, labels=labels).logits, expected.logits)


def test_unpatch_restores_training_forward_bit_exactly():
    model = tiny_model("gemma2").train()
    ids, labels = batch()
    before = model(input_ids=ids, labels=labels)
    report = patch_model(model)
    assert "fused_linear_cross_entropy(softcap=30)" in report.swapped[""]
    assert model(input_ids=ids, labels=labels).logits is None
    unpatch_model(model)
    after = model(input_ids=ids, labels=labels)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)
    assert "forward" not in model.__dict__ and patch_report(model) is None


def _unknown_model(cls_name, **overrides):
    config = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def test_unknown_model_types_are_probed():
    # OLMo (1) has the standard head: the probe agrees and the head is swapped.
    olmo = _unknown_model("OlmoConfig")
    assert olmo.config.model_type not in CASES
    report = patch_model(olmo)
    assert report.counts()["fused_linear_cross_entropy"] == 1
    ids, labels = batch()
    assert olmo(input_ids=ids, labels=labels).logits is None
    # GPT-2's LMHeadModel: another name, another decoder attribute (transformer), same loss.
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                attn_pdrop=0.0)).train()
    plain = copy.deepcopy(gpt2)
    assert patch_model(gpt2).counts()["fused_linear_cross_entropy"] == 1
    fused, expected = gpt2(input_ids=ids, labels=labels), plain(input_ids=ids, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, expected.loss)
    # Cohere multiplies its logits by logit_scale: the probe disagrees and the loss stays the model's.
    cohere = _unknown_model("CohereConfig", logit_scale=0.5)
    report = patch_model(cohere)
    assert report.counts()["fused_linear_cross_entropy"] == 0
    assert "did not match the fused loss" in report.skipped["lm_head"]
    assert cohere(input_ids=ids, labels=labels).logits is not None


def test_hooked_or_wrapped_heads_are_left_alone():
    model = tiny_model("llama").train()
    model.lm_head.register_forward_pre_hook(lambda module, args: None)
    report = patch_model(model)
    assert report.counts()["fused_linear_cross_entropy"] == 0 and "forward hooks" in report.skipped["lm_head"]
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_deepcopy_and_pickle_keep_the_patched_head():
    import io

    model = tiny_model("llama").train()
    patch_model(model)
    ids, labels = batch()
    expected = model(input_ids=ids, labels=labels).loss
    for twin in (copy.deepcopy(model), torch.load(io.BytesIO(_saved(model)), weights_only=False)):
        out = twin(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, expected)


def _saved(model) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_cpu_runs_the_models_own_loss_unless_a_backend_is_asked_for():
    import metalcore

    model = tiny_model("llama").train()
    patch_model(model)
    ids, labels = batch()
    with metalcore.use_backend("auto"):  # the CPU is in OWN_CODE_DEVICES: HF's loss, with logits
        assert model(input_ids=ids, labels=labels).logits is not None
    assert model(input_ids=ids, labels=labels).logits is None  # the suite's fixture asks for "reference"
