"""What one call launches: the torch ops it dispatches and the Triton kernels it launches, on any device.

On a GPU every launch costs host time (13-33 us each on the H100 VM of
benchmarks/results/2026-11-22-h100/), so an op made of many small launches is bound by the host whatever
its kernels do. Launches can be counted without a GPU: torch ops through a ``TorchDispatchMode``, Triton
launches by wrapping ``JITFunction.run`` (and the interpreter's ``InterpretedFunction.run``).

What counts as a torch op: every dispatched aten op except views and allocations (``empty`` and the like
launch no kernel). One aten op can launch more than one CUDA kernel (``sort``, for one), so on a GPU the
kernel count can be higher; there, :func:`cuda_kernels` counts the kernels the profiler records. Ops the
Triton interpreter runs internally are not counted: they stand for a GPU kernel's own work.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {"aten.empty", "aten.empty_like", "aten.new_empty", "aten.empty_strided", "aten.new_empty_strided",
              "aten.detach"}


class LaunchCount:
    """``torch``: Counter of aten op name -> calls; ``triton``: Counter of kernel name -> launches."""

    def __init__(self) -> None:
        self.torch: Counter = Counter()
        self.triton: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.torch.values()) + sum(self.triton.values())

    def summary(self) -> str:
        ops = ", ".join(f"{n.removeprefix('aten.')} {c}" for n, c in sorted(self.torch.items()))
        kernels = ", ".join(f"{n} {c}" for n, c in sorted(self.triton.items()))
        return (f"{self.total} launches: {sum(self.torch.values())} torch ops ({ops or '-'}); "
                f"{sum(self.triton.values())} Triton ({kernels or '-'})")


class _TorchOps(TorchDispatchMode):
    def __init__(self, count: LaunchCount, paused: list[bool]):
        super().__init__()
        self.count, self.paused = count, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not (self.paused[0] or func.is_view or name in _NO_KERNEL):
            self.count.torch[name] += 1
        return func(*args, **(kwargs or {}))


def _triton_runners() -> list[type]:
    """The classes whose ``run`` launches a Triton kernel (compiled, and under TRITON_INTERPRET=1)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Counts what the block launches (see the module docstring)."""
    count, paused = LaunchCount(), [False]
    originals = {cls: cls.run for cls in _triton_runners()}

    def wrap(run):
        def counted(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            count.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            paused[0] = True  # the interpreter's own torch ops are the kernel's work, not launches
            try:
                return run(self, *args, **kwargs)
            finally:
                paused[0] = False

        return counted

    for cls, run in originals.items():
        cls.run = wrap(run)
    try:
        with _TorchOps(count, paused):
            yield count
    finally:
        for cls, run in originals.items():
            cls.run = run


def cuda_kernels(fn: Callable[[], object]) -> int:
    """CUDA kernels the profiler records during one call of ``fn`` (a GPU only)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
