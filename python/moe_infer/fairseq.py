"""``moe_infer.fairseq``: the fairseq-compatible MoE layer (implemented in moe_infer.integrations.fairseq)."""

from .integrations.fairseq import (  # noqa: F401
    GATINGS,
    FairseqExperts,
    MOELayer,
    Top1Gate,
    Top2Gate,
    convert_fairseq_moe,
    gate_from_fairseq,
)

__all__ = ["FairseqExperts", "MOELayer", "Top1Gate", "Top2Gate", "convert_fairseq_moe", "gate_from_fairseq"]
