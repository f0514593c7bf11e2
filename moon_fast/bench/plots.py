"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

* ``<op>_<dtype>.png``: forward+backward time (median, p20-p80 band) and TFLOP/s against size, one
  line per backend (forward only for ops without a backward).
* ``contrastive_memory.png``: peak memory against batch size per backend and dtype.
* ``train.png``: training-step throughput (samples/s) and peak memory per backend.

Labels are split into a series group (one panel row each) and an x value (log2 axis) by
:func:`axis_of`; a shape that is alone in its group is drawn as bars per backend.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

_NUM = re.compile(r"([A-Za-z_]\w*)=([0-9][0-9.eE+]*)")


def _skeleton(label: str) -> str:
    return _NUM.sub(lambda m: m.group(1) + "=#", str(label))


def axis_of(labels: list[str]) -> dict[str, tuple[str, str | None, float | None]]:
    """{label: (group, x name, x)}. Labels with the same skeleton (numbers blanked) form a family; the
    LAST ``name=number`` position that varies within the family is the x axis and the label without
    it names the group: "d=64 S=512", "d=64 S=1024", "d=128 S=512" -> groups "d=64", "d=128", x = S.
    A label alone in its family has no x (plotted as bars per backend)."""
    fam: dict[str, list[str]] = defaultdict(list)
    for lb in dict.fromkeys(str(x) for x in labels):
        fam[_skeleton(lb)].append(lb)
    out = {}
    for members in fam.values():
        vals = [[m.group(2) for m in _NUM.finditer(lb)] for lb in members]
        varying = [i for i in range(len(vals[0])) if len({v[i] for v in vals}) > 1]
        for lb in members:
            if not varying:
                out[lb] = (lb, None, None)
                continue
            m = list(_NUM.finditer(lb))[varying[-1]]
            group = re.sub(r"([:,;])\s*[,;]", r"\1", lb[:m.start()] + lb[m.end():]).strip(" ,;")
            try:
                out[lb] = (" ".join(group.split()), m.group(1), float(m.group(2)))
            except ValueError:
                out[lb] = (lb, None, None)
    return out


def _mode_rows(rows: list[dict]) -> list[dict]:
    """The fwd+bwd rows of an op, or fwd rows for cases that have no backward."""
    with_bwd = {(r["backend"], r["dtype"], r["label"]) for r in rows if r["mode"] == "fwd+bwd" and r["status"] == "ok"}
    return [r for r in rows if r["status"] == "ok" and (
        r["mode"] == "fwd+bwd" or (r["mode"] == "fwd" and (r["backend"], r["dtype"], r["label"]) not in with_bwd))]


def _groups(rows: list[dict]) -> dict:
    """{group name: (x axis name or None, [(x, row)])} (see :func:`axis_of`); without an x axis the x
    is the label's position."""
    ax = axis_of([r["label"] for r in rows])
    out: dict = {}
    for r in rows:
        g, name, x = ax[str(r["label"])]
        out.setdefault(g, (name, []))[1].append((x if name else 0, r))
    return out


def _style_x(ax, xname, pts):
    if xname:
        ax.set_xlabel(xname)
        ax.set_xscale("log", base=2)
    else:
        ticks = sorted({(x, str(r["label"])) for x, r in pts})
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=30, ha="right", fontsize=7)
    ax.grid(alpha=0.3)


def make_plots(rows: list[dict], out_dir: str, title_suffix: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        ok = _mode_rows(op_rows)
        if not ok:
            continue
        if op == "train":
            written.append(_train_plot(plt, ok, out_dir, title_suffix))
            continue
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in ok) else "fwd"
        for dtype in sorted({r["dtype"] for r in ok}):
            groups = _groups([r for r in ok if r["dtype"] == dtype])
            fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.3 * len(groups)), squeeze=False)
            for (g, (xname, pts)), (ax_t, ax_f) in zip(groups.items(), axes):
                if len({x for x, _ in pts}) == 1:  # one shape: bars per backend read better than points
                    names = list(dict.fromkeys(r["backend"] for _, r in pts))
                    by_b = {r["backend"]: r for _, r in pts}
                    ax_t.bar(names, [by_b[b]["p50_s"] * 1e3 for b in names],
                             yerr=[[(by_b[b]["p50_s"] - by_b[b]["p20_s"]) * 1e3 for b in names],
                                   [(by_b[b]["p80_s"] - by_b[b]["p50_s"]) * 1e3 for b in names]])
                    ax_f.bar(names, [by_b[b].get("tflops") or 0.0 for b in names], color="tab:green")
                    ax_t.set_ylabel(f"{mode} ms (median, p20-p80)")
                    ax_f.set_ylabel("TFLOP/s")
                    for ax in (ax_t, ax_f):
                        ax.set_title(str(pts[0][1]["label"]), fontsize=9)
                        ax.tick_params(axis="x", labelsize=7, rotation=20)
                        ax.grid(alpha=0.3, axis="y")
                    continue
                for backend in dict.fromkeys(r["backend"] for _, r in pts):
                    ser = sorted(((x, r) for x, r in pts if r["backend"] == backend), key=lambda p: p[0])
                    x = [p[0] for p in ser]
                    line, = ax_t.plot(x, [p[1]["p50_s"] * 1e3 for p in ser], "o-", label=backend)
                    ax_t.fill_between(x, [p[1]["p20_s"] * 1e3 for p in ser], [p[1]["p80_s"] * 1e3 for p in ser],
                                      color=line.get_color(), alpha=0.2)
                    if any(p[1].get("tflops") for p in ser):
                        ax_f.plot(x, [p[1].get("tflops") or float("nan") for p in ser], "o-", label=backend,
                                  color=line.get_color())
                ax_t.set_ylabel(f"{mode} ms (median, p20-p80)")
                ax_t.set_yscale("log")
                ax_f.set_ylabel("TFLOP/s")
                for ax in (ax_t, ax_f):
                    _style_x(ax, xname, pts)
                    ax.set_title(g or op, fontsize=9)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
            fig.suptitle(f"{op} {dtype}{title_suffix}")
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{dtype}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        if op == "contrastive":
            mem = [r for r in ok if r.get("peak_mem_bytes") is not None]
            if mem:
                groups = _groups(mem)
                fig, axes = plt.subplots(len(groups), 1, figsize=(6.5, 3.5 * len(groups)), squeeze=False)
                for (g, (xname, pts)), (ax,) in zip(groups.items(), axes):
                    for backend, dtype in dict.fromkeys((r["backend"], r["dtype"]) for _, r in pts):
                        ser = sorted(((x, r["peak_mem_bytes"] / 2**20) for x, r in pts
                                      if r["backend"] == backend and r["dtype"] == dtype), key=lambda p: p[0])
                        ax.plot([p[0] for p in ser], [p[1] for p in ser], "o-", label=f"{backend} {dtype}")
                    ax.set_ylabel("peak memory above inputs, MiB")
                    _style_x(ax, xname, pts)
                    if xname:
                        ax.set_yscale("symlog", linthresh=1.0)
                    ax.set_title(g or "contrastive loss", fontsize=9)
                    ax.legend(fontsize=7)
                fig.suptitle(f"contrastive loss memory, fwd+bwd{title_suffix}")
                fig.tight_layout()
                path = os.path.join(out_dir, "contrastive_memory.png")
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(path)
    return written


def _train_plot(plt, ok: list[dict], out_dir: str, title_suffix: str) -> str:
    names = [f"{r['backend']}\n{r['dtype']} {r['label']}" for r in ok]
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_s.bar(range(len(ok)), [r.get("samples_per_s") or (1.0 / r["p50_s"]) for r in ok])
    ax_s.set_ylabel("samples/s" if all(r.get("samples_per_s") for r in ok) else "steps/s")
    ax_m.bar(range(len(ok)), [(r.get("peak_mem_bytes") or 0) / 2**20 for r in ok], color="tab:orange")
    ax_m.set_ylabel("peak memory, MiB")
    for ax in (ax_s, ax_m):
        ax.set_xticks(range(len(ok)), names, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"training step (fwd + bwd + optimizer){title_suffix}")
    fig.tight_layout()
    path = os.path.join(out_dir, "train.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
