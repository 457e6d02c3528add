"""How the public ops call their torch.library custom ops.

A custom op call costs about 0.3 ms of Python on a CPU before the implementation runs
(schema binding, the Autograd and ADInplaceOrView redispatch, the dynamo-disable wrapper):
as much as a decode step's attention itself on a small model. An eager call that needs none
of that runs the registered function directly; everything else (torch.compile tracing,
fake tensors and other dispatch or function modes, tensor subclasses, calls that autograd
records) goes through the op.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def custom_op(name: str, *, mutates_args):
    """``torch.library.custom_op``, keeping the undecorated function for ``call``."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.direct = fn
        return op
    return wrap


def call(op, *args):
    """``op(*args)``, or ``op.direct(*args)`` when nothing needs the dispatcher."""
    if _direct_ok(args):
        return op.direct(*args)
    return op(*args)


def _direct_ok(args) -> bool:
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor or (grad and a.requires_grad):
                return False
    return True
