"""moe_mlp: dropless grouped-GEMM expert dispatch (issue 4). Skeleton: to be written."""

from moon_fast.backends import op_backends

BACKENDS = op_backends("moe_mlp", {"cuda": ("triton", "cuda", "grouped_mm", "torch"), "cpu": ("torch",)})


def moe_mlp(hidden, expert_idx, expert_weight, gate_up_proj, down_proj, *, backend="auto"):
    raise NotImplementedError("moe_mlp: not written yet")
