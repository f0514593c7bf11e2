"""Named backends for every op, and the one rule that picks among them.

Each op (``contrastive_loss``, ``moe_mlp``, ``flash_attention``) owns an :class:`OpBackends` registry.
Implementations register under a name:

* ``reference``: plain PyTorch, obviously correct, materialises everything (the oracle).
* ``torch``: portable and memory-efficient, any device.
* ``triton``: our Triton kernels (a CUDA GPU, or the interpreter with ``TRITON_INTERPRET=1`` on CPU).
* ``cuda``: our csrc kernels in ``moon_fast._C``.
* ``cuda_emu``: the same csrc kernels compiled for the CPU emulator (``moon_fast._C_emu``); tests only,
  never chosen by ``auto``.
* ``cpu``: native multithreaded CPU kernels in ``moon_fast._C_cpu`` (csrc/cpu/).
* peers: ``sdpa``, ``flash_attn``, ``grouped_mm``, ``megablocks``, ... where they exist.

``backend="auto"`` takes the first available name of the op's preference list for the device of the
inputs. ``MOON_FAST_<OP>_BACKEND`` (e.g. ``MOON_FAST_MOE_MLP_BACKEND=triton``) overrides ``auto``.
Asking for an unavailable backend raises :class:`BackendUnavailable` saying why and what to do.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# A check returns None when the backend can run on that device, else the reason it cannot.
AvailabilityCheck = Callable[[torch.device], "str | None"]


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend cannot run here; the message says why and what to do."""


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


# ----------------------------------------------------------------------------- availability checks

def triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; Linux only)"
    if _device_type(device) == "cuda":
        return None
    if _device_type(device) == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("Triton runs on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1 before "
                "importing triton (slow; for tests), or use backend='torch' on the CPU")
    return f"Triton does not support device type {_device_type(device)!r}"


def cuda_ext_unavailable(device: torch.device) -> str | None:
    from moon_fast import _ext

    reason = _ext.cuda_ext_error()
    if reason:
        return reason
    if _device_type(device) != "cuda":
        return (f"the cuda backend runs on CUDA tensors, got {_device_type(device)} tensors "
                "(use backend='torch' on the CPU, or 'cuda_emu' to run the same kernels under the CPU emulator)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def cuda_emu_unavailable(device: torch.device) -> str | None:
    from moon_fast import _ext

    reason = _ext.emu_ext_error()
    if reason:
        return reason
    if _device_type(device) != "cpu":
        return "cuda_emu runs the csrc kernels under the CPU emulator: it takes CPU tensors only"
    return None


def cpu_ext_unavailable(device: torch.device) -> str | None:
    from moon_fast import _ext

    reason = _ext.cpu_ext_error()
    if reason:
        return reason
    if _device_type(device) != "cpu":
        return f"the cpu backend runs native CPU kernels: it takes CPU tensors, got {_device_type(device)} tensors"
    return None


def package_unavailable(module: str, install_hint: str, *, needs_cuda: bool = False) -> AvailabilityCheck:
    """A check for a peer library: importable, and (optionally) only on CUDA tensors."""

    def check(device: torch.device) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed ({install_hint})"
        if needs_cuda and _device_type(device) != "cuda":
            return f"{module} runs on CUDA tensors only"
        return None

    return check


def always_available(device: torch.device) -> str | None:
    return None


# ----------------------------------------------------------------------------- registry

@dataclass
class Backend:
    name: str
    fn: Callable
    unavailable: AvailabilityCheck
    description: str = ""


@dataclass
class OpBackends:
    """The backends of one op and its ``auto`` preference per device type."""

    op: str
    auto_order: dict[str, Sequence[str]] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)

    @property
    def env_var(self) -> str:
        return f"MOON_FAST_{self.op.upper()}_BACKEND"

    def register(self, name: str, *, unavailable: AvailabilityCheck = always_available, description: str = ""):
        """Decorator: ``@OPS.register("torch")`` over the implementation function."""

        def deco(fn: Callable) -> Callable:
            self.backends[name] = Backend(name, fn, unavailable, description or (fn.__doc__ or "").strip().split("\n")[0])
            return fn

        return deco

    def why_unavailable(self, name: str, device: torch.device | str) -> str | None:
        if name not in self.backends:
            return f"unknown backend {name!r} for {self.op}; known: {', '.join(self.backends)}"
        return self.backends[name].unavailable(torch.device(device))

    def availability(self, device: torch.device | str) -> dict[str, str | None]:
        """{backend name: None if it runs on this device, else the reason it does not}."""
        return {name: self.why_unavailable(name, device) for name in self.backends}

    def resolve(self, backend: str, device: torch.device | str, *, order: Sequence[str] | None = None) -> Backend:
        """Returns the backend to run for tensors on ``device``; raises BackendUnavailable. ``order``: an
        ``auto`` preference for this call instead of the device type's (e.g. one that depends on dtype)."""
        device = torch.device(device)
        if backend == "auto":
            forced = os.environ.get(self.env_var)
            if forced:
                backend = forced
                source = f"(forced by {self.env_var}={forced}) "
            else:
                for name in order or self.auto_order.get(device.type, ("torch",)):
                    if name in self.backends and self.why_unavailable(name, device) is None:
                        return self.backends[name]
                raise BackendUnavailable(
                    f"{self.op}: no backend available on {device.type}: "
                    + "; ".join(f"{n}: {r}" for n, r in self.availability(device).items() if r)
                )
        else:
            source = ""
        reason = self.why_unavailable(backend, device)
        if reason is not None:
            usable = [n for n, r in self.availability(device).items() if r is None]
            raise BackendUnavailable(
                f"{self.op}: backend {backend!r} {source}cannot run on {device.type}: {reason}. "
                f"Available here: {', '.join(usable) or 'none'} (or backend='auto')."
            )
        return self.backends[backend]


REGISTRY: dict[str, OpBackends] = {}


def op_backends(op: str, auto_order: dict[str, Sequence[str]]) -> OpBackends:
    """Creates (once) and returns the registry of ``op``."""
    if op not in REGISTRY:
        REGISTRY[op] = OpBackends(op, dict(auto_order))
    return REGISTRY[op]


# ----------------------------------------------------------------------------- autocast

def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): never autocast there
        return False


def autocast_inputs(device: torch.device | str, *tensors, policy: str):
    """Casts an op's floating inputs the way torch.autocast would, so callers may use our ops inside
    ``torch.autocast`` regions (mixed fp32/bf16 inputs otherwise meet inside the backends).

    ``policy="lower_precision"``: matmul-like ops (attention, MoE) run in the autocast dtype.
    ``policy="float32"``: loss-like ops (contrastive loss) run in float32, as autocast does for
    softmax/cross-entropy. Outside autocast the tensors are returned unchanged. Run the op itself under
    ``torch.autocast(device_type, enabled=False)`` so its internals see exactly these dtypes.
    """
    device_type = torch.device(device).type
    if not _autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type) if policy == "lower_precision" else torch.float32
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def float32_under_autocast(fn: Callable) -> Callable:
    """Decorator for loss-like ops: inside ``torch.autocast`` every floating tensor argument (also inside
    lists/tuples) is cast to float32 and the op runs with autocast disabled, as autocast itself treats
    softmax and cross-entropy. Outside autocast the call is unchanged."""

    def cast(x):
        if isinstance(x, torch.Tensor):
            return x.float() if x.is_floating_point() else x
        if isinstance(x, list | tuple):
            return type(x)(cast(v) for v in x)
        return x

    def device_type(args, kwargs) -> str:
        for x in (*args, *kwargs.values()):
            for t in (x if isinstance(x, list | tuple) else (x,)):
                if isinstance(t, torch.Tensor):
                    return t.device.type
        return "cpu"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = device_type(args, kwargs)
        if not _autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*cast(args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper
