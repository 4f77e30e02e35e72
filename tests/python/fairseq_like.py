"""A stand-in for fairseq's MoE modules (fairseq itself is not installable here).

Same class names, constructor arguments, parameter names and forward contracts as
fairseq/modules/moe/{top1gate,top2gate,moe_layer}.py and the FeedForwardNetwork experts, computed
with moe_infer.reference's plain-PyTorch re-implementation of fairseq's gating (dense one-hot
masks, cumsum, einsum dispatch and combine). It shares no code with moe_infer's ops or layer.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moe_infer import reference as ref


class FeedForwardNetwork(nn.Module):
    def __init__(self, embed_dim, ffn_dim, activation_fn=F.relu):
        super().__init__()
        self.activation_fn = activation_fn
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class _Gate(nn.Module):
    """What fairseq's two gates share: the router ``wg`` and the forward contract."""

    def __init__(self, model_dim, num_experts, use_fp32, moe_eval_capacity_token_fraction):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.use_fp32 = use_fp32
        self.moe_eval_capacity_token_fraction = moe_eval_capacity_token_fraction

    def forward(self, input, mask=None):
        l_aux, combine, dispatch, _ = self.gating(self.wg(input), mask)
        return l_aux, combine, dispatch, {}


class Top1Gate(_Gate):
    def __init__(
        self,
        model_dim,
        num_experts,
        use_fp32=False,
        input_noise_type=None,
        capacity_factor=1.0,
        moe_eval_capacity_token_fraction=0.25,
        use_tutel=False,
        init_model_on_gpu=False,
    ):
        super().__init__(model_dim, num_experts, use_fp32, moe_eval_capacity_token_fraction)
        self.input_noise_type = input_noise_type
        self.capacity_factor = capacity_factor

    def gating(self, logits, mask):
        return ref.fairseq_top1gating(
            logits, mask, self.capacity_factor, not self.training, self.moe_eval_capacity_token_fraction
        )


class Top2Gate(_Gate):
    def __init__(
        self,
        model_dim,
        num_experts,
        use_fp32=False,
        second_expert_policy="sampling",
        normalize_gate_prob_before_dropping=False,
        moe_eval_capacity_token_fraction=0.25,
        batch_prioritized_routing=False,
        use_tutel=False,
        init_model_on_gpu=False,
    ):
        super().__init__(model_dim, num_experts, use_fp32, moe_eval_capacity_token_fraction)
        self.second_expert_policy = second_expert_policy
        self.normalize_gate_prob_before_dropping = normalize_gate_prob_before_dropping
        self.batch_prioritized_routing = batch_prioritized_routing

    def gating(self, logits, mask):
        return ref.fairseq_top2gating(
            logits,
            mask,
            self.second_expert_policy,
            self.normalize_gate_prob_before_dropping,
            not self.training,
            self.moe_eval_capacity_token_fraction,
            self.batch_prioritized_routing,
        )


class MOELayer(nn.Module):
    def __init__(self, gate, experts, args=None, group=None, all2all_group=None):
        super().__init__()
        self.gate = gate
        self.experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList([experts])
        self.args = args

    def forward(self, *input, input_padding_mask=None):
        x = input[0]
        tokens = x.reshape(-1, x.shape[-1])
        mask = None if input_padding_mask is None else input_padding_mask.reshape(-1)
        l_aux, combine, dispatch, self.metadata = self.gate(tokens, mask)
        num_tokens, num_experts, capacity = dispatch.shape
        dispatched = dispatch.to(x.dtype).permute(1, 2, 0).reshape(num_experts * capacity, num_tokens) @ tokens
        dispatched = dispatched.view(num_experts, capacity, -1)
        expert_out = torch.stack([expert(dispatched[e]) for e, expert in enumerate(self.experts)])
        out = combine.to(x.dtype).reshape(num_tokens, -1) @ expert_out.reshape(num_experts * capacity, -1)
        return out.view(x.shape), l_aux


class TransformerLayer(nn.Module):
    """A fairseq-style block holding a MoE layer as ``moe_layer`` (pre-norm, residual)."""

    def __init__(self, moe_layer, embed_dim):
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.moe_layer = moe_layer

    def forward(self, x, padding_mask=None):
        out, l_aux = self.moe_layer(self.final_layer_norm(x), input_padding_mask=padding_mask)
        return x + out, l_aux


def make_moe_layer(model_dim, ffn_dim, num_experts, top_k=2, activation_fn=F.relu, **gate_kwargs):
    gate_class = Top1Gate if top_k == 1 else Top2Gate
    gate = gate_class(model_dim, num_experts, **gate_kwargs)
    with torch.no_grad():
        gate.wg.weight.normal_(0, 1.0)  # decisive routing: no near-ties between experts
    experts = nn.ModuleList(FeedForwardNetwork(model_dim, ffn_dim, activation_fn) for _ in range(num_experts))
    return MOELayer(gate, experts)
