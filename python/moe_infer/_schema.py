"""The op schemas (csrc/registration.cpp) as Python reads them: argument names, in order, and defaults.

The fakes and the autograd formulas take arguments and return gradients by these names, so neither
restates an op's signature or counts its arguments.
"""

import functools
import types

import torch


@functools.cache
def _schema_arguments(op: str):
    return tuple(getattr(torch.ops.moe_infer, op).default._schema.arguments)


def argument_names(op: str) -> tuple[str, ...]:
    return tuple(argument.name for argument in _schema_arguments(op))


def complete(op: str, values, kwargs=None) -> tuple:
    """Every argument value in schema order: those given (positionally or by name), then the
    schema's defaults (the dispatcher leaves trailing defaults out when it calls Python)."""
    kwargs = kwargs or {}
    out = list(values)
    for argument in _schema_arguments(op)[len(out) :]:
        out.append(kwargs[argument.name] if argument.name in kwargs else argument.default_value)
    return tuple(out)


def arguments(op: str, values, kwargs=None) -> types.SimpleNamespace:
    """An op's argument values by their schema names."""
    return types.SimpleNamespace(**dict(zip(argument_names(op), complete(op, values, kwargs))))


def per_argument(op: str, **values) -> tuple:
    """One entry per op argument, in schema order: the given ones, None for the others."""
    names = argument_names(op)
    unknown = set(values) - set(names)
    if unknown:
        raise AssertionError(f"moe_infer::{op} has no argument {sorted(unknown)}")
    return tuple(values.get(name) for name in names)
