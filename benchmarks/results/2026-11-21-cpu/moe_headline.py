"""Issue 4 headline: T=4096, H=I=1024, E=8, k=2, fp32 and bf16, forward+backward, one run."""
import json
import sys
from dataclasses import asdict

from moon_fast.bench import harness, moe

cases = [c for c in moe.cases(False) if c.label == "T=4096,E=8" and c.backend in ("torch", "hf_grouped_mm", "hf_eager", "dense_gemm")]
out = []
for c in cases:
    for r in harness.run_case(c, warmup=1, repeats=5):
        out.append(asdict(r))
        print(r.backend, r.dtype, r.mode, r.status, r.p50_s, r.p20_s, r.p80_s, r.peak_mem_bytes, r.tflops, flush=True)
json.dump({"machine": harness.machine_info(), "results": out}, open(sys.argv[1], "w"), indent=1)
