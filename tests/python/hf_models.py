"""Small transformers v5 MoE models built from configs with seeded random weights (no downloads).

For tests and benchmarks of :mod:`moe_infer.integrations.hf`: ``build_model(arch, ...)`` returns a
model in eval mode whose routing is decisive (router weights scaled up, so that no token sits on a
near-tie between experts) and whose DeepSeek-V3 selection bias is non-zero and negative (so the
group mask matters).

transformers 5.x's NLLB-MoE expert loop is wrong: it one-hot encodes the 0/1 top-1 mask instead of
the expert ids, so every token goes through experts 0 and 1 whatever the router chose.
:func:`correct_nllb_moe_experts` puts back the loop of fairseq and transformers 4.x (each expert
on the tokens with a non-zero combine weight), which is what moe_infer computes.
"""

import types
from typing import Optional

import torch

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "switch", "nllb_moe")
ENCODER_DECODER = ("switch", "nllb_moe")


def make_config(
    arch: str,
    hidden: int = 64,
    ffn: int = 32,
    experts: int = 8,
    top_k: int = 2,
    layers: int = 2,
    vocab: int = 128,
    heads: int = 4,
    **overrides,
):
    """The transformers config of a small ``arch`` model (one of :data:`ARCHITECTURES`)."""
    import transformers as tf

    head_dim = hidden // heads
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        initializer_range=hidden**-0.5,
        num_experts_per_tok=top_k,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=ffn, num_local_experts=experts)
    elif arch == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **common,
            intermediate_size=4 * ffn,
            moe_intermediate_size=ffn,
            shared_expert_intermediate_size=2 * ffn,
            num_experts=experts,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    elif arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **common, head_dim=head_dim, moe_intermediate_size=ffn, num_experts=experts, norm_topk_prob=True
        )
    elif arch == "olmoe":
        config = tf.OlmoeConfig(**common, intermediate_size=ffn, num_experts=experts, norm_topk_prob=False)
    elif arch == "gpt_oss":
        config = tf.GptOssConfig(
            **common,
            head_dim=head_dim,
            intermediate_size=ffn,
            num_local_experts=experts,
            sliding_window=64,
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        )
    elif arch == "deepseek_v3":
        config = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": heads},  # multi-head latent attention: one KV head per head
            intermediate_size=4 * ffn,
            moe_intermediate_size=ffn,
            n_routed_experts=experts,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=head_dim - 8,
            v_head_dim=head_dim,
        )
    elif arch == "switch":
        config = tf.SwitchTransformersConfig(
            vocab_size=vocab,
            d_model=hidden,
            d_kv=head_dim,
            d_ff=ffn,
            num_layers=layers,
            num_decoder_layers=layers,
            num_sparse_encoder_layers=layers,
            num_sparse_decoder_layers=layers,
            num_heads=heads,
            num_experts=experts,
            expert_capacity=64,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
        )
    elif arch == "nllb_moe":
        config = tf.NllbMoeConfig(
            vocab_size=vocab,
            d_model=hidden,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            num_experts=experts,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            max_position_embeddings=2048,
            init_std=hidden**-0.5,
            decoder_start_token_id=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        raise ValueError(f"unknown architecture '{arch}', expected one of {ARCHITECTURES}")
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def model_class(arch: str):
    import transformers as tf

    if arch == "switch":
        return tf.SwitchTransformersForConditionalGeneration
    if arch == "nllb_moe":
        return tf.NllbMoeForConditionalGeneration
    return tf.AutoModelForCausalLM


def build_model(
    arch: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: Optional[str] = "eager",
    **config_options,
):
    """A seeded ``arch`` model in eval mode (see :func:`make_config` for the sizes)."""
    config = make_config(arch, **config_options)
    torch.manual_seed(seed)
    cls = model_class(arch)
    if arch in ENCODER_DECODER:
        config._attn_implementation = "eager"  # NLLB-MoE supports no other
        model = cls(config)
    else:
        model = cls.from_config(config, experts_implementation=experts_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Routers: logits of order 4 so that top-k choices are decisive in every dtype.
            if name.endswith((".gate.weight", ".router.weight", ".router.classifier.weight")):
                param.normal_(0, 4.0 / param.shape[1] ** 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer) - 1.0)
    return model.to(dtype).eval()


def _nllb_moe_experts_forward(self, hidden_states, router_mask, router_probs):
    """NLLB-MoE's expert loop as fairseq and transformers 4.x compute it (plain PyTorch)."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        rows = router_probs[:, e] != 0
        if rows.any():
            expert_out = self[f"expert_{e}"](hidden_states[rows]) * router_probs[rows, e, None]
            if self.moe_token_dropout > 0:
                expert_out = (
                    self.token_dropout(expert_out) if self.training else expert_out * (1 - self.moe_token_dropout)
                )
            out[rows] += expert_out.to(out.dtype)
    return out


def correct_nllb_moe_experts(model):
    """Replaces transformers' NLLB-MoE expert loop by the correct one on every NllbMoeExperts of model."""
    for module in model.modules():
        if type(module).__name__ == "NllbMoeExperts":
            module.forward = types.MethodType(_nllb_moe_experts_forward, module)
    return model
