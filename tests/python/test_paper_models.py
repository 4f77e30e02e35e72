"""The whole models of bench/paper_models.py, at tiny sizes: static and dynamic gating agree wherever
static gating drops nothing, and differ where it drops.

LM: the fairseq-style MoE LM with gating="static" (fairseq's capacity computation) against
gating="dynamic". MT: transformers' NLLB-MoE, whose shipped expert loop is wrong in 5.x (see
hf_models), with the corrected loop as the reference for moe_infer.optimize (capacity-free and
hf_capacity=True), on the encoder, the logits and greedy generation with a KV cache.
"""

import copy
import os
import sys

import pytest
import torch

import hf_models
import moe_infer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import paper_models  # noqa: E402

TINY_LM = {**paper_models.LM, "d_model": 32, "ffn": 64, "layers": 4, "heads": 2, "num_experts": 16, "vocab": 64}
TINY_MT = {
    **paper_models.MT,
    "d_model": 32,
    "ffn": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "heads": 2,
    "num_experts": 8,
    "sparse_step": 2,
    "vocab": 64,
    "src_len": 12,
    "new_tokens": 5,
}


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def lm_outputs(model, tokens):
    """(static logits, dynamic logits, static MoE metadata), the same second-expert draws for both."""
    outputs = {}
    for mode in ("static", "dynamic"):
        model.set_gating(mode)
        torch.manual_seed(3)  # policy 'sampling': the same Gumbel noise in both modes
        with torch.no_grad():
            outputs[mode] = model(tokens)
        if mode == "static":
            metadata = [moe.metadata for moe in model.moe_layers()]
    return outputs["static"], outputs["dynamic"], metadata


def test_lm_layout_is_fairseqs():
    model = paper_models.build_lm(TINY_LM)
    # fairseq's MoE LMs: layer i is an MoE layer when (i + 1) % moe_freq == 0
    assert [layer.moe is not None for layer in model.layers] == [False, True, False, True]
    gate = model.moe_layers()[0].gate
    assert (gate.num_experts, gate.top_k, gate.second_expert_policy) == (16, 2, "sampling")
    assert gate.moe_eval_capacity_token_fraction == 0.25


@pytest.mark.parametrize("causal", [True, False])
def test_layer_attends_forward_only_when_causal(causal):
    """An LM layer's attention sees only earlier tokens; an encoder's (causal=False) sees them all."""
    torch.manual_seed(0)
    layer = paper_models.LMLayer({**TINY_LM, "causal": causal}, False, torch.float32)
    x = torch.randn(2, 6, TINY_LM["d_model"])
    changed = x.clone()
    changed[:, -1] += 1.0  # only the last token differs
    with torch.no_grad():
        first, first_changed = layer(x)[:, 0], layer(changed)[:, 0]
        # attend() is forward()'s attention sublayer
        h = layer.attend(x)
        torch.testing.assert_close(layer(x), h + layer.fc2(torch.nn.functional.gelu(layer.fc1(layer.ffn_norm(h)))))
    assert torch.equal(first, first_changed) == causal


def test_lm_static_equals_dynamic_when_nothing_is_dropped():
    model = paper_models.build_lm({**TINY_LM, "eval_capacity_fraction": 1.0})
    tokens = torch.randint(0, TINY_LM["vocab"], (3, 10))
    static, dynamic, metadata = lm_outputs(model, tokens)
    for m in metadata:
        assert m["capacity"] == 30  # ceil(1.0 * S)
        assert float(m["overflow_expert1"]) == 0 and float(m["overflow_expert2"]) == 0
        assert float(m["placeholder_fraction"]) > 0.8  # E * C rows computed for 2 * S real ones
    torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)


def test_lm_static_drops_at_the_papers_fraction():
    model = paper_models.build_lm({**TINY_LM, "num_experts": 4})
    tokens = torch.randint(0, TINY_LM["vocab"], (4, 16))
    static, dynamic, metadata = lm_outputs(model, tokens)
    assert [m["capacity"] for m in metadata] == [16, 16]  # ceil(0.25 * 64)
    # 4 experts, 64 tokens, top-2: 32 pairs per expert on average for 16 slots. Static drops pairs,
    # so the whole model's logits differ from dynamic gating's.
    dropped = sum(float(m["overflow_expert1"]) + float(m["overflow_expert2"]) for m in metadata)
    assert dropped > 0
    assert relative_error(static, dynamic) > 1e-3


def test_lm_bfloat16_static_equals_dynamic_when_nothing_is_dropped():
    model = paper_models.build_lm({**TINY_LM, "eval_capacity_fraction": 1.0}, dtype=torch.bfloat16)
    tokens = torch.randint(0, TINY_LM["vocab"], (2, 8))
    static, dynamic, _ = lm_outputs(model, tokens)
    assert static.dtype == torch.bfloat16
    assert relative_error(static, dynamic) < 2e-2


def mt_models(**overrides):
    models = paper_models.build_mt({**TINY_MT, **overrides})
    reference = hf_models.correct_nllb_moe_experts(copy.deepcopy(models["static"]))
    exact = moe_infer.optimize(copy.deepcopy(models["static"]), hf_capacity=True, verbose=False)
    return models, reference, exact


def mt_logits(model, source):
    with torch.no_grad():
        decoder_input = torch.full((source.shape[0], 3), 2)
        return model(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=decoder_input).logits


def test_mt_config_is_nllb_moes():
    models = paper_models.build_mt(TINY_MT)
    config = models["static"].config
    assert (config.num_experts, config.moe_eval_capacity_token_fraction, config.second_expert_policy) == (8, 1.0, "all")
    assert type(models["static"]).__name__ == "NllbMoeForConditionalGeneration"
    assert len(models["dynamic"].moe_infer_report.replaced) == 2  # one sparse layer in the encoder, one in the decoder


def test_mt_dynamic_equals_transformers_at_fraction_one():
    models, reference, exact = mt_models()
    source = paper_models.mt_source(3, TINY_MT)
    want = mt_logits(reference, source)
    assert relative_error(mt_logits(models["dynamic"], source), want) < 1e-5
    assert relative_error(mt_logits(exact, source), want) < 1e-5
    encoded = {name: paper_models.mt_encode(m, source) for name, m in (("ref", reference), ("dyn", models["dynamic"]))}
    assert relative_error(encoded["dyn"].last_hidden_state, encoded["ref"].last_hidden_state) < 1e-5
    generated = {
        name: paper_models.mt_generate(m, encoded[name], source, TINY_MT["new_tokens"])
        for name, m in (("ref", reference), ("dyn", models["dynamic"]))
    }
    assert generated["ref"].shape == (3, 1 + TINY_MT["new_tokens"])
    assert torch.equal(generated["dyn"], generated["ref"])


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_mt_hf_capacity_reproduces_transformers_drops(fraction):
    models, reference, exact = mt_models(eval_capacity_fraction=fraction)
    source = paper_models.mt_source(4, TINY_MT)
    want = mt_logits(reference, source)
    assert relative_error(mt_logits(exact, source), want) < 1e-5
    # transformers drops pairs at this capacity; capacity-free routing computes them
    assert relative_error(mt_logits(models["dynamic"], source), want) > 1e-3


def test_mt_static_is_transformers_as_shipped():
    """The benchmark's static model runs transformers' own NLLB-MoE blocks (no moe_infer)."""
    models = paper_models.build_mt(TINY_MT)
    blocks = [m for m in models["static"].modules() if type(m).__name__ == "NllbMoeSparseMLP"]
    assert len(blocks) == 2
    assert all(type(b).__module__ == "transformers.models.nllb_moe.modeling_nllb_moe" for b in blocks)
    assert all("forward" not in b.experts.__dict__ for b in blocks)  # the shipped expert loop


def test_mt_fairseq_static_equals_transformers_at_fraction_one():
    """The fairseq-static baseline: fairseq's static gating on NLLB-MoE's weights drops nothing at its
    eval fraction 1.0, so it gives the corrected transformers model's logits and greedy tokens."""
    models = paper_models.build_mt(TINY_MT, static="fairseq")
    reference = hf_models.correct_nllb_moe_experts(paper_models.build_mt(TINY_MT)["static"])
    layers = [m.fairseq for m in models["static"].modules() if type(m).__name__ == "NllbMoeSparseMLP"]
    assert len(layers) == 2 and all(layer.gating == "static" for layer in layers)
    source = paper_models.mt_source(3, TINY_MT)
    assert relative_error(mt_logits(models["static"], source), mt_logits(reference, source)) < 1e-5
    for layer in layers:
        assert float(layer.metadata["overflow_expert1"]) == 0 and float(layer.metadata["overflow_expert2"]) == 0
    encoded = paper_models.mt_encode(models["static"], source)
    generated = paper_models.mt_generate(models["static"], encoded, source, TINY_MT["new_tokens"])
    want = paper_models.mt_generate(reference, paper_models.mt_encode(reference, source), source, TINY_MT["new_tokens"])
    assert torch.equal(generated, want)


def test_mt_fairseq_static_drops_below_fraction_one():
    models = paper_models.build_mt({**TINY_MT, "eval_capacity_fraction": 0.25}, static="fairseq")
    source = paper_models.mt_source(4, TINY_MT)
    static = paper_models.mt_encode(models["static"], source).last_hidden_state
    dynamic = paper_models.mt_encode(models["dynamic"], source).last_hidden_state
    encoder_layer = next(m.fairseq for m in models["static"].get_encoder().modules() if hasattr(m, "fairseq"))
    assert encoder_layer.metadata["capacity"] == 12  # ceil(0.25 * 48 tokens)
    assert float(encoder_layer.metadata["overflow_expert1"]) + float(encoder_layer.metadata["overflow_expert2"]) > 0
    assert relative_error(static, dynamic) > 1e-3
