"""pytest plugin for transformers' own model test suites: every model they build is optimized.

``scripts/hf_model_tests.sh`` runs tests/models/<arch>/test_modeling_<arch>.py of the installed
transformers' source distribution with ``-p moe_infer_optimize_plugin`` (this file on PYTHONPATH)
when MOE_INFER_OPTIMIZE=1: ``PreTrainedModel.post_init`` (the last step of every model's
construction) then calls ``moe_infer.optimize`` on the model. Models without a supported sparse MoE
block are left as they are.
"""

import os

import pytest


def pytest_configure(config):
    if os.environ.get("MOE_INFER_OPTIMIZE") != "1":
        return
    import transformers

    import moe_infer

    original = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        try:
            moe_infer.optimize(self, verbose=False)
        except ValueError as error:
            if "has no supported sparse MoE block" not in str(error):
                raise
        return result

    transformers.PreTrainedModel.post_init = post_init
    config.moe_infer_optimized = True


@pytest.hookimpl(trylast=True)
def pytest_report_header(config):
    return f"moe_infer.optimize on every model: {'yes' if getattr(config, 'moe_infer_optimized', False) else 'no'}"
