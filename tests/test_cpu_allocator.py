"""The caching CPU allocator (csrc/cpu/caching_allocator.cpp, moon_fast/cpu_allocator.py). It replaces torch's
CPU allocator for a whole process, so each test runs its check in a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moon_fast import _ext, cpu_allocator

pytestmark = pytest.mark.skipif(_ext.cpu_ext_error() is not None, reason=f"CPU extension: {_ext.cpu_ext_error()}")


def _run(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_freed_large_blocks_are_reused_without_page_faults_or_heap_growth():
    """benchmarks/cpu_probes.py's heap-growth rounds (a 64 MiB tensor, a small tensor kept alive after it, the
    large one freed; 8 rounds), with torch's allocator and with the caching one."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import cpu_probes

    def rounds(**env):
        out = _run(cpu_probes._HEAP_GROWTH, **env)  # "page faults per round [..]; data segment grew N MiB"
        faults = [int(v) for v in out.split("[")[1].split("]")[0].split(",")]
        return max(faults[1:]), int(out.split("grew ")[1].split()[0])

    faults_off, _ = rounds()
    faults_on, grew_on = rounds(MOON_FAST_CPU_CACHE_MB="1024")
    assert faults_off >= 32, faults_off  # torch's allocator: 64 MiB faulted in again every round
    assert faults_on < 16, faults_on
    assert grew_on < 64 + 32, grew_on  # one cached block, not one per round (glibc with mmap off: 201 MiB)


def test_values_limit_and_accounting_under_random_traffic():
    out = _run("""
        import random, torch
        from moon_fast import cpu_allocator
        limit_mb = 48
        cpu_allocator.enable(limit_mb)
        rng = random.Random(0)
        live = []
        for step in range(400):
            if live and rng.random() < 0.45:
                live.pop(rng.randrange(len(live)))
            else:
                n = rng.choice([rng.randrange(1, 4096), rng.randrange(250_000, 6_000_000)])  # floats
                t = torch.full((n,), float(step))
                live.append((t, float(step)))
            s = cpu_allocator.stats()
            assert s.cached_bytes <= limit_mb << 20, s
            for t, v in live[-8:]:  # a block handed out twice would have been overwritten
                assert t[0].item() == v and t[-1].item() == v
        assert all(bool((t == v).all()) for t, v in live)
        live.clear()
        del t  # the loop variable held the last tensor checked
        s = cpu_allocator.stats()
        assert s.live_bytes == 0 and s.hits > 0 and s.misses > 0, s
        cpu_allocator.empty_cache()
        assert cpu_allocator.stats().cached_bytes == 0
        print("ok")
    """)
    assert out == "ok"


def test_rounding_wastes_at_most_an_eighth():
    mib = 1 << 20
    assert cpu_allocator.rounded_size(1000) == 1000 and cpu_allocator.rounded_size(mib - 1) == mib - 1
    assert cpu_allocator.rounded_size(mib) == mib and cpu_allocator.rounded_size(32 * mib) == 32 * mib
    assert cpu_allocator.rounded_size(mib + 1) == mib + mib // 8
    assert cpu_allocator.rounded_size(33 * mib) == 36 * mib
    for n in range(mib, 200 * mib, 999_983):
        r = cpu_allocator.rounded_size(n)
        assert n <= r <= n + n // 8, (n, r)


def test_moe_forward_backward_is_unchanged_and_reuses_blocks():
    out = _run("""
        import torch
        from moon_fast import cpu_allocator
        from moon_fast.ops import moe_mlp
        torch.manual_seed(0)
        t, h, i, e, k = 1024, 256, 512, 4, 2  # (T*k, 2I) fp32 activations: 8 MiB
        x = torch.randn(t, h, requires_grad=True)
        idx = torch.randint(0, e, (t, k)); w = torch.rand(t, k, requires_grad=True)
        gu = (torch.randn(e, 2 * i, h) * 0.05).requires_grad_(); down = (torch.randn(e, h, i) * 0.05).requires_grad_()
        def step():
            for p in (x, w, gu, down):
                p.grad = None
            out = moe_mlp(x, idx, w, gu, down, backend="torch")
            out.square().sum().backward()
            return [out.detach().clone()] + [p.grad.clone() for p in (x, w, gu, down)]
        before = step()
        cpu_allocator.enable(512)
        first, second = step(), step()
        assert all(torch.equal(a, b) for a, b in zip(before, first))
        assert all(torch.equal(a, b) for a, b in zip(before, second))
        assert cpu_allocator.stats().hits > 0
        print("ok")
    """)
    assert out == "ok"


def test_threads_and_fork():
    out = _run("""
        import os, threading, torch
        from moon_fast import cpu_allocator
        cpu_allocator.enable(256)
        errors = []
        def work(seed):
            g = torch.Generator().manual_seed(seed)
            for j in range(40):
                n = int(torch.randint(300_000, 3_000_000, (1,), generator=g))
                v = float(seed * 1000 + j)
                a = torch.full((n,), v)
                if not bool((a == v).all()):
                    errors.append((seed, j))
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for th in threads: th.start()
        for th in threads: th.join()
        assert not errors, errors
        pid = os.fork()
        if pid == 0:  # the child allocates through the inherited allocator, then leaves at once
            ok = bool((torch.full((2_000_000,), 3.0) == 3.0).all())
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        print("ok")
    """)
    assert out == "ok"


def test_moon_fast_turns_it_on_only_when_asked():
    code = "import moon_fast.cli; from moon_fast import cpu_allocator; print(cpu_allocator.stats().limit_bytes)"
    assert _run(code, MOON_FAST_CPU_CACHE_MB="256") == str(256 << 20)
    assert _run(code, MOON_FAST_CPU_CACHE_MB="0") == "-1"  # never enabled: torch's own allocator


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv(cpu_allocator.ENV, "4GB")
    with pytest.raises(ValueError, match="MOON_FAST_CPU_CACHE_MB must be a whole number of MiB"):
        cpu_allocator.limit_from_env()
    with pytest.raises(ValueError, match="limit_mb must be >= 0"):
        cpu_allocator.enable(-1)
