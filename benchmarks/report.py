"""The run's markdown summary and PNG plots.

``summary.md``: what ran where (GPU, versions, commit, time, the peaks measured in the run), every DESIGN.md
goal beside its measured and predicted value with met / missed / unmeasured, the providers (measured or
skipped, with the reason), the plan (what the budget left out) and per-op tables. ``speedup_vs_m.png``:
fastpeft's speedup over dense bf16 + LoRA against M, one line per shape (measured solid, estimates
dashed). ``roofline_fraction.png``: each fastpeft kernel's fraction of the run's peaks, measured beside
predicted.
"""

from __future__ import annotations

from pathlib import Path

from .core import LABEL_CPU, LABEL_ESTIMATE, LABEL_MEASURED
from .goals import GoalResult

__all__ = ["plots", "summary"]

_SPEEDUP_OPS = ("qlora_linear", "lora_linear")
_MODES = ("fwd", "fwd+bwd")


def _num(value: object) -> float | None:
    try:
        return float(value) if value not in ("", None) else None
    except (TypeError, ValueError):
        return None


def _fmt_goal(res: GoalResult, value: float | None) -> str:
    if value is None:
        return "–"
    kind = res.goal.kind
    if kind in ("speedup", "memory"):
        return f"{value:.2f}×"
    if kind == "overhead":
        return f"{value:+.1%}"
    if kind == "static-ipw":
        return f"{value:.1f} ins/w"
    return f"{value:.0%}"


def _goal_table(goals: list[GoalResult]) -> list[str]:
    lines = ["| case | goal | measured | predicted (estimate) | verdict |", "|---|---|---|---|---|"]
    for res in goals:
        measured = _fmt_goal(res, res.measured) + (f" ({res.measured_at})" if res.measured_at else "")
        measured, predicted_at = measured.replace(" M=0)", ")"), res.predicted_at.removesuffix(" M=0")
        where = ", ".join(x for x in (predicted_at, res.predicted_basis) if x)
        predicted = _fmt_goal(res, res.predicted) + (f" ({where})" if where else "")
        verdict = res.verdict + (f": {res.note}" if res.note else "")
        lines.append(f"| {res.goal.case} | {res.goal.target} | {measured} | {predicted} | {verdict} |")
    return lines


def _pivot(rows: list[dict], col: str, title: str) -> list[str]:
    """Per op and mode: one line per (shape, M), one column per provider with ``col`` (ms)."""
    out: list[str] = []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        for mode in list(dict.fromkeys(r["mode"] for r in rows if r["op"] == op)):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and _num(r.get(col)) is not None]
            if not sel:
                continue
            providers = list(dict.fromkeys(r["provider"] for r in sel))
            cells: dict[tuple, dict[str, float]] = {}
            for r in sel:
                cells.setdefault((r["shape"], int(r["M"])), {})[r["provider"]] = _num(r[col])
            out += ["", f"**{op} {mode}** — {title}", "", "| shape | M | " + " | ".join(providers) + " |",
                    "|---|---|" + "---|" * len(providers)]  # fmt: skip
            for (shape, m), by in cells.items():
                vals = " | ".join(f"{by[p]:.4g}" if p in by else "–" for p in providers)
                out.append(f"| {shape} | {m} | {vals} |")
    return out


def summary(rows: list[dict], goals: list[GoalResult], manifest: dict, files: dict[str, Path]) -> str:
    env, peaks, plan = manifest["env"], manifest["peaks"], manifest["plan"]
    gpu = manifest["device"] == "gpu"
    date = env["timestamp"][:10]
    head = f"# fastpeft bench — {env['gpu'] if gpu else 'CPU only, no GPU'} — {date}"
    lines = [head, ""]
    lines.append(
        f"torch {env['torch']}, triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, commit {env['git_sha']}, "
        f"{env['timestamp']}. Peaks measured in this run on the {peaks['device']}: {peaks['tflops']:.1f} TFLOP/s "
        f"({peaks['matmul']}), {peaks['gbps']:.0f} GB/s ({peaks['copy']})."
    )
    lines.append("")
    if gpu:
        lines.append(
            "Rows labelled `measured` ran on this GPU; every ratio compares providers measured in this run. "
            "`predicted` figures are **estimates**: the compile gate's cost model for the NF4 decode and dequantize "
            "kernels and the roofline for every other kernel, on the cost model's machine (an H100 SXM)."
        )
    else:
        lines.append(
            f"**No GPU here.** Rows labelled `{LABEL_CPU}` ran fastpeft's CPU path (kernels/reference.py), "
            "eager torch, torch.compile, PEFT and bitsandbytes on the CPU at small shapes: they show that every "
            "provider runs, and say nothing about speed. GPU figures are **estimates** (rows labelled "
            f"`{LABEL_ESTIMATE}`): the compile gate's cost model for the kernels that decode NF4 weights (issue-bound "
            "vs memory-bound from their SASS) and the roofline for every other kernel, on an H100 SXM. No goal is "
            "met or missed without a GPU measurement; the decode kernel's static goals come from the gate."
        )
    lines += ["", "## Goals (DESIGN.md)", "", *_goal_table(goals), ""]
    lines += ["## Providers", "", "| op | provider | status |", "|---|---|---|"]
    for op, status in manifest["providers"].items():
        lines += [f"| {op} | {p} | {s} |" for p, s in status.items()]
    skipped = plan["skipped"]
    budget = f"--budget {plan['budget_s']:.0f} s" if plan["budget_s"] else "no budget"
    lines += ["", "## Plan", "", f"{plan['measured']} cases measured in {plan['measure_s']:.0f} s ({budget}); "
              f"{len(skipped)} skipped."]  # fmt: skip
    if manifest["gate"]["error"]:
        lines.append(f"Compile gate: {manifest['gate']['error']}; its kernels take the roofline instead.")
    for item in skipped[:40]:
        lines.append(f"- {item['case']}: {item['reason']}")
    if len(skipped) > 40:
        lines.append(f"- … and {len(skipped) - 40} more (all in manifest.json)")
    measured = [r for r in rows if r.get("label") in (LABEL_MEASURED, LABEL_CPU)]
    estimates = [r for r in rows if r.get("predicted_ms") not in ("", None)]
    lines += ["", "## Results", ""]
    if measured:
        label = "measured on this GPU" if gpu else "CPU, not a speed claim"
        lines += _pivot(measured, "p50_ms", f"median ms ({label})")
    lines += _pivot(estimates, "predicted_ms", "predicted ms (estimate, H100 SXM cost model)")
    lines += ["", "## Plots", ""]
    for key in ("speedup_plot", "roofline_plot"):
        if key in files:
            lines.append(f"![{key}]({files[key].name})")
    if not any(key in files for key in ("speedup_plot", "roofline_plot")):
        lines.append("Plots not written: matplotlib is not installed (pip install matplotlib).")
    lines.append("")
    lines.append(
        "All rows: results.csv (DESIGN.md's schema + label, path, predicted, basis); run details: manifest.json."
    )
    return "\n".join(lines) + "\n"


def _speedup_series(rows: list[dict], op: str, mode: str, col: str, measured: bool) -> dict[str, list[tuple]]:
    """shape -> [(M, speedup over dense-bf16)] from ``col`` (p50_ms or predicted_ms)."""
    sel = [r for r in rows if r["op"] == op and r["mode"] == mode and _num(r.get(col)) is not None]
    if measured:
        sel = [r for r in sel if r.get("label") == LABEL_MEASURED]
    by: dict[tuple, dict[str, float]] = {}
    for r in sel:
        by.setdefault((r["shape"], int(r["M"])), {})[r["provider"]] = _num(r[col])
    series: dict[str, list[tuple]] = {}
    for (shape, m), t in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if "fastpeft" in t and "dense-bf16" in t:
            series.setdefault(shape, []).append((m, t["dense-bf16"] / t["fastpeft"]))
    return series


def plots(out: Path, rows: list[dict]) -> dict[str, Path]:
    """Write the two PNGs; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, Path] = {}
    fig, axes = plt.subplots(len(_SPEEDUP_OPS), len(_MODES), figsize=(12, 8), squeeze=False)
    for i, op in enumerate(_SPEEDUP_OPS):
        for j, mode in enumerate(_MODES):
            ax = axes[i][j]
            for measured, col, style in ((True, "p50_ms", "-o"), (False, "predicted_ms", "--x")):
                for shape, pts in _speedup_series(rows, op, mode, col, measured).items():
                    ms, sp = zip(*pts, strict=True)
                    ax.plot(ms, sp, style, label=f"{shape} ({'measured' if measured else 'estimate'})")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}: fastpeft vs dense bf16 + LoRA")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speedup (×)")
            if ax.lines[1:]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    files["speedup_plot"] = out / "speedup_vs_m.png"
    fig.savefig(files["speedup_plot"], dpi=110)
    plt.close(fig)

    ours = [
        r for r in rows
        if r["provider"] == "fastpeft" and r["op"] != "finetune_step"
        and (_num(r.get("predicted")) is not None or (r.get("label") == LABEL_MEASURED and _num(r.get("frac_of_peak"))))
    ]  # fmt: skip
    first_shape: dict[str, str] = {}
    for r in ours:
        first_shape.setdefault(r["op"], r["shape"])
    bars: dict[str, dict[str, float]] = {}
    for r in ours:
        if r["shape"] != first_shape[r["op"]]:
            continue
        m = f" M={r['M']}" if str(r["M"]) != "0" else ""
        name = f"{r['op']} {r['mode']}{m} {r['shape']} [{r.get('path', '')}]"
        if r.get("label") == LABEL_MEASURED and _num(r.get("frac_of_peak")) is not None:
            bars.setdefault(name, {})["measured"] = _num(r["frac_of_peak"])
        if _num(r.get("predicted")) is not None:
            bars.setdefault(name, {})["estimate"] = _num(r["predicted"])
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.28 * len(bars) + 1)))
    names = list(bars)
    for k, (kind, hatch, color) in enumerate((("measured", "", "tab:blue"), ("estimate", "//", "tab:orange"))):
        ys = [i + 0.4 * k for i in range(len(names))]
        ax.barh(
            ys,
            [bars[n].get(kind, 0.0) for n in names],
            height=0.4,
            hatch=hatch,
            color=color,
            label=kind if kind == "measured" else "estimate (cost model / roofline, H100 SXM)",
        )
    ax.set_yticks([i + 0.2 for i in range(len(names))], names, fontsize=7)
    ax.set_xlabel("fraction of peak (compute or bandwidth, whichever binds)")
    ax.set_title("fastpeft kernels: fraction of roofline (one shape per op)")
    ax.set_xlim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    files["roofline_plot"] = out / "roofline_fraction.png"
    fig.savefig(files["roofline_plot"], dpi=110)
    plt.close(fig)
    return files
