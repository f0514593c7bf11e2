"""`moon-fast env`: versions, devices, the extensions, and which backend of each op can run here."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="report versions, GPU, extension build and available backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything `moon-fast env` reports, as a JSON-able dict."""
    import torch

    import moon_fast
    from moon_fast import _ext, ops  # noqa: F401  (importing ops registers every backend)
    from moon_fast.backends import REGISTRY

    gpu = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if gpu else [])
    info = {
        "moon_fast": moon_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_runtime_available": gpu,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else [],
        "cpu_threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),  # set by moon_fast/cli.py
        "ld_preload": os.environ.get("LD_PRELOAD") or None,  # e.g. tcmalloc (README, "Page faults")
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
        "extensions": {
            "moon_fast._C": {"built": _ext.cuda_ext_error() is None, "archs": _ext.cuda_ext_archs(),
                             "error": _ext.cuda_ext_error()},
            "moon_fast._C_emu": {"built": _ext.emu_ext_error() is None, "error": _ext.emu_ext_error()},
        },
        "ops": {
            name: {dev: {b: (r or "available") for b, r in reg.availability(dev).items()} for dev in devices}
            for name, reg in sorted(REGISTRY.items())
        },
    }
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"moon_fast {info['moon_fast']}  python {info['python']}  {info['platform']}")
    print(f"torch {info['torch']} (CUDA build: {info['torch_cuda_build'] or 'no'})  triton {info['triton']}  "
          f"transformers {info['transformers']}  deepspeed {info['deepspeed']}")
    print(f"GPU: {', '.join(info['gpu']) if info['gpu'] else 'none'}   CPU threads: {info['cpu_threads']}   "
          f"THP_MEM_ALLOC_ENABLE={info['thp_mem_alloc_enable']}   "
          f"malloc: {info['ld_preload'] or 'glibc (large CPU temporaries page-fault every step; README: tcmalloc)'}")
    for name, ext in info["extensions"].items():
        state = "built" + (f" (archs {ext['archs']})" if ext.get("archs") else "") if ext["built"] else ext["error"]
        print(f"{name}: {state}")
    for op, per_device in info["ops"].items():
        for dev, backends in per_device.items():
            print(f"{op} on {dev}:")
            for b, state in backends.items():
                mark = "ok " if state == "available" else "-- "
                print(f"  {mark}{b:<12} {'' if state == 'available' else state}")
    return 0
