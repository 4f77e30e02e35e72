"""Integrations with other libraries; each imports its library and is optional (``hf``: transformers v5)."""
