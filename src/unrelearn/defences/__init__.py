"""Defences: wrappers that make any unlearning method's erasure resist fine-tuning.

A defence registers a prefix (``meta:``) and turns a method class into a defended one without
touching the method's file; ``resolve_method("meta:esd-u-1")`` finds it. ``resalign`` is also a
method of its own (the paper's objective).
"""

from unrelearn.defences import meta as _meta  # noqa: F401  (registers "meta:")
from unrelearn.defences import resalign as _resalign  # noqa: F401  (registers "resalign" and "resalign:")
