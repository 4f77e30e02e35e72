"""Drop-in integrations with other libraries' MoE layers: ``fairseq`` (no dependency) and ``hf``
(transformers v5, optional: ``moe_infer[hf]``)."""
