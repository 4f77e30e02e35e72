"""Drop-in integrations of moe_infer with other libraries' MoE layers."""
