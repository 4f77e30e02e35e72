"""pytest plugin for transformers' own model test suites: every model they build is optimized.

``scripts/hf_model_tests.sh`` runs tests/models/<arch>/test_modeling_<arch>.py of transformers'
test tree with ``-p moe_infer_optimize_plugin`` (this file on PYTHONPATH). With
MOE_INFER_OPTIMIZE=1, ``PreTrainedModel.post_init`` (the last step of every model's construction,
``from_pretrained`` included) then calls ``moe_infer.optimize`` on the model. Models without a
supported sparse MoE block are left as they are. The terminal summary says how many models were
built, how many of them had blocks replaced and how many block forwards ran on moe_infer's fused
path, so a run shows that optimize was applied and used.
"""

import os

import pytest

_COUNTS = {"built": 0, "optimized": 0, "fused": 0}


def pytest_configure(config):
    if os.environ.get("MOE_INFER_OPTIMIZE") != "1":
        return
    import torch
    import transformers

    import moe_infer

    original = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _COUNTS["built"] += 1
        try:
            report = moe_infer.optimize(self, verbose=False).moe_infer_report
        except ValueError as error:
            if "has no supported sparse MoE block" not in str(error):
                raise
        else:
            _COUNTS["optimized"] += bool(report.replaced or report.already_optimized)
        return result

    run = moe_infer.experts.LocalExperts.run

    def counted_run(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # a counter in a compiled graph would guard its recompiles
            _COUNTS["fused"] += 1
        return run(self, *args, **kwargs)

    transformers.PreTrainedModel.post_init = post_init
    moe_infer.experts.LocalExperts.run = counted_run
    config.moe_infer_optimized = True


@pytest.hookimpl(trylast=True)
def pytest_report_header(config):
    return f"moe_infer.optimize on every model: {'yes' if getattr(config, 'moe_infer_optimized', False) else 'no'}"


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "moe_infer_optimized", False):
        terminalreporter.write_line(
            f"moe_infer: {_COUNTS['built']} models built, {_COUNTS['optimized']} with sparse MoE blocks on moe_infer, "
            f"{_COUNTS['fused']} eager block forwards on moe_infer's fused path"
        )
