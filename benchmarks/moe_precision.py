"""How far each moe_mlp backend's 16-bit output and gradients are from the fp32 reference, relative to the
reference run in the same dtype: the RMS error (and the max error) of the backend over that of the reference,
per dtype and backend, the worst over several seeds. 1.0x means the backend rounds as the reference does.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set here). ``--interpreter-truncates`` leaves
Triton's interpreter converting fp32 to bf16 by truncation, as Triton 3.8 does (kernels/_interpreter_rounding.py
is not installed): the error a test of the Triton backend saw before that module.

    python benchmarks/moe_precision.py [--seeds 10] [--interpreter-truncates] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

BACKENDS = ("torch", "cpu", "grouped_mm", "triton", "cuda", "cuda_emu")  # those that run on the device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--interpreter-truncates", action="store_true")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    if args.interpreter_truncates:
        if "moon_fast.kernels._utils" in sys.modules:
            p.error("--interpreter-truncates needs a fresh process: the kernels were imported already")
        import moon_fast.kernels._interpreter_rounding as rounding

        rounding.install = lambda: None  # before anything imports kernels/_utils.py
    from moon_fast.bench.harness import machine_info
    from moon_fast.ops.moe import BACKENDS as REGISTRY
    from tests.test_moe_op import NAMES, RMS_CASE, make_inputs, run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, t, h, i, e, k, routing = RMS_CASE
    info = machine_info()
    lines = [f"# moe_mlp 16-bit error over the same-dtype reference's, T={t} H={h} I={i} E={e} k={k}, seeds "
             f"0-{args.seeds - 1}; interpreter truncates: {args.interpreter_truncates}",
             "# " + str({key: info.get(key) for key in ("device", "torch", "triton", "commit")})]
    backends = [b for b in BACKENDS if REGISTRY.why_unavailable(b, device) is None]

    def rms(x):
        return x.float().pow(2).mean().sqrt().item()

    for dtype in (torch.float16, torch.bfloat16):
        worst = {(b, n): [0.0, 0.0] for b in backends for n in NAMES}
        for seed in range(args.seeds):
            tensors, idx, grad = make_inputs(t, h, i, e, k, routing, torch.float32, seed=seed)
            tensors, idx, grad = [x.to(device) for x in tensors], idx.to(device), grad.to(device)
            ref32 = run("reference", tensors, idx, grad)
            ref_lp = run("reference", tensors, idx, grad, dtype)
            for b in backends:
                for name, g, r_lp, r32 in zip(NAMES, run(b, tensors, idx, grad, dtype), ref_lp, ref32):
                    w = worst[(b, name)]
                    w[0] = max(w[0], rms(g.float() - r32) / rms(r_lp.float() - r32))
                    w[1] = max(w[1], (g.float() - r32).abs().max().item() / (r_lp.float() - r32).abs().max().item())
        for b in backends:
            cells = "  ".join(f"{n} {worst[(b, n)][0]:.2f}/{worst[(b, n)][1]:.2f}" for n in NAMES)
            lines.append(f"{str(dtype).replace('torch.', ''):8s} {b:10s} RMS/max ratio: {cells}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
