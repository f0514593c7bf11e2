"""ParamCall: read a module's parameters outside that module's forward, as a module call of its own.

DeepSpeed ZeRO-3 partitions every parameter (its ``.data`` is an empty tensor between uses) and
gathers a module's parameters with hooks around that module's ``forward``; in the backward it gathers
them again with hooks on the tensors the forward returned. A parameter read anywhere else (the loss
code reads the dual-alignment matrix W* of each MoE layer and the model's logit scales after the
backbone ran) is seen empty: in the forward, and, worse, when autograd accumulates its gradient
("The size of tensor a (0) must match the size of tensor b (4)"; for a 0-dim parameter the gradient
is silently dropped). Registering such parameters on an outer module only covers the forward when
that module returns something other than tensors (``LossOutput``): DeepSpeed cannot hook it.

``ParamCall(fn, *params)`` is a parameter-free child module whose forward returns ``fn(*args, *params)``
(a tensor or a tuple of tensors). Under ZeRO-3 it registers ``params`` as its external parameters
(:func:`deepspeed.zero.register_external_parameter`, on first call once they are ZeRO parameters),
so they are gathered for the call and again, through the hooks on its outputs, before their gradient
is accumulated. Without ZeRO-3 it is a plain function call. It owns nothing: the parameters keep
their names and places in the state dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class ParamCall(nn.Module):
    """forward(*args) -> fn(*args, *params). ``fn`` must be picklable (a module-level function or a
    functools.partial of one) and return a tensor or a tuple of tensors."""

    def __init__(self, fn: Callable, *params: nn.Parameter):
        super().__init__()
        self.fn = fn
        # A tuple is not registered by nn.Module: the parameters stay owned by their module.
        self._params: tuple[nn.Parameter, ...] = tuple(params)
        self._zero3_registered = False

    def __call__(self, *args):
        if not self._zero3_registered and any(hasattr(p, "ds_id") for p in self._params):
            import deepspeed

            for p in self._params:
                deepspeed.zero.register_external_parameter(self, p)
            self._zero3_registered = True
        return super().__call__(*args)

    def forward(self, *args):
        return self.fn(*args, *self._params)

    def extra_repr(self) -> str:
        name = getattr(self.fn, "__name__", None) or getattr(getattr(self.fn, "func", None), "__name__", "fn")
        return f"{name}, params={[tuple(getattr(p, 'ds_shape', p.shape)) for p in self._params]}"


def log_softmax_rows(w: torch.Tensor) -> torch.Tensor:
    """(Z, M) -> float32 log-softmax over dim 1."""
    return w.float().log_softmax(dim=1)


def capped_float_exp(max_log: float, *log_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float32 exp(s) for each (0-dim) log scale, after clamping the parameter itself at ``max_log`` in place
    (as CLIP does): its gradient still flows at the cap. Clamping exp(s) instead gave s a zero gradient
    above the cap, where the optimizer's momentum could leave it for good. Under ZeRO-3 the clamp holds for
    this call only (the gathered copy is not written back); the value used is capped all the same."""
    with torch.no_grad():
        for s in log_scales:
            s.clamp_(max=max_log)
    return tuple(s.float().exp() for s in log_scales)
