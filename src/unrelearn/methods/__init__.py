"""Unlearning methods: one file per method, registered by decorator and discovered on import."""

import importlib
import pkgutil

from unrelearn.methods.base import (
    ClosedFormMethod,
    Method,
    OptimizationConfig,
    OptimizationMethod,
    method_names,
    register_method,
    resolve_method,
    select_parameters,
    unlearn,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

import unrelearn.defences  # noqa: F401  (registers the defence prefixes once the methods exist)

__all__ = [
    "ClosedFormMethod", "Method", "OptimizationConfig", "OptimizationMethod", "method_names",
    "register_method", "resolve_method", "select_parameters", "unlearn",
]  # fmt: skip
