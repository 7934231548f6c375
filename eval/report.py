"""Pareto plots and the README table from eval/results/summary.jsonl.

    python eval/report.py                      # one PNG per task: eval/results/pareto_<task>.png
    python eval/report.py table=true           # also print the headline rows, the frontier comparison and
                                               # every setting per task
    python eval/report.py summary=eval/results/low_latency/summary.jsonl out_dir=eval/results/low_latency

Beside each pareto_<task>.png, calls_<task>.png puts success against full-call equivalents per chunk
(the denoiser's FLOPs over one full call's; DDIM-K is K) and, when <out_dir>/delay/<task>_delay*ms.json
exist (eval/rollout.py async_loop=true inference_delay_ms=...), success against injected delay.

Each point is one (policy, method setting): success rate with its 95% Wilson CI against batch-1 chunk
latency (log scale). Plain step reduction (uncached DDPM-100 and DDIM-K) is drawn as a line: the
frontier a caching method has to beat.
"""

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/report.py` from the repo root

from eval.cli import hydra_app  # noqa: E402
from policy_accel.recipes import STEP_FAMILIES  # noqa: E402

FAMILY_STYLE = {  # method family -> (colour, marker)
    "uncached": ("black", "s"), "ddim": ("black", "o"), "flow": ("black", "o"), "lossless": ("grey", "D"),
    "uniform": ("tab:orange", "v"), "taylorseer": ("tab:green", "^"), "bac": ("tab:blue", "<"),
    "bac_taylor": ("tab:red", "*"), "diffusers_taylorseer": ("tab:purple", "P"), "every_step": ("grey", "x"),
    "diffusers_fbc": ("tab:cyan", "h"), "diffusers_magcache": ("tab:brown", "X"), "compile": ("tab:pink", "d"),
}


def load_rows(summary) -> list[dict]:
    path = Path(summary)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}; run eval/sweep.py first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for policy in {r["policy"] for r in rows}:
        hashes = {r.get("checkpoint_hash") for r in rows if r["policy"] == policy}
        if len(hashes) > 1:
            raise ValueError(f"{path}: the rows of {policy} come from {len(hashes)} different checkpoints "
                             f"({sorted(str(h)[:12] for h in hashes)}); a replaced checkpoint's rows belong in "
                             f"eval/results/superseded/, not beside the new one's")
    return rows


def frontier(rows: list[dict]) -> list[dict]:
    """Uncached + DDIM-K rows sorted by latency."""
    return sorted((r for r in rows if r["method"] in ("uncached", *STEP_FAMILIES)), key=lambda r: r["latency_ms_p50"])


def zoom_floor(rows: list[dict]) -> float:
    """Bottom of the zoomed panel: a little under the lowest CI of the step-reduction line."""
    lows = [r["ci_low"] for r in frontier(rows)] or [0.0]
    return max(0.0, math.floor((min(lows) - 0.05) * 20) / 20)


def point_labels(rows: list[dict], rel_latency: float = 0.05) -> list[tuple[float, float, str]]:
    """(latency, success, text) per label; points with equal success within `rel_latency` of each other
    share one label ("uncached / compile"), since two labels on one spot cannot both be read."""
    labels: list[list] = []
    for r in sorted(rows, key=lambda r: r["latency_ms_p50"]):
        x, y = r["latency_ms_p50"], r["success_rate"]
        near = next((lab for lab in labels if lab[1] == y and abs(x / lab[0] - 1) <= rel_latency), None)
        if near:
            near[2] += f" / {r['setting']}"
        else:
            labels.append([x, y, r["setting"]])
    return [tuple(lab) for lab in labels]


def plot_task(summary, task: str, out_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    rows = [r for r in load_rows(summary) if r["task"] == task]
    if not rows:
        raise ValueError(f"no rows for task {task!r} in {summary}")
    # left: everything; right: the top band, where most points sit, stretched so their labels separate
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), gridspec_kw={"width_ratios": [1, 1.4]})
    line, floor = frontier(rows), zoom_floor(rows)
    for ax, zoomed in zip(axes, (False, True), strict=True):
        if line:
            ax.plot([r["latency_ms_p50"] for r in line], [r["success_rate"] for r in line], "-", color="black",
                    alpha=0.6, label="step reduction (uncached / fewer steps)", zorder=1)
        seen = set()
        for r in rows:
            family = r["method"].removeprefix("compile+")
            colour, marker = FAMILY_STYLE.get(family, ("tab:brown", "X"))
            label = r["method"] if r["method"] not in seen else None
            seen.add(r["method"])
            filled = "@" not in r["setting"] and not r["method"].startswith("compile")
            y = r["success_rate"]  # the Wilson bounds can miss 0 or 1 by a rounding error: clip the bars at 0
            err = [[max(0.0, y - r["ci_low"])], [max(0.0, r["ci_high"] - y)]]
            ax.errorbar(r["latency_ms_p50"], y, yerr=err, fmt=marker, color=colour, ecolor=colour, alpha=0.8,
                        markerfacecolor=colour if filled else "white", capsize=2, label=label, zorder=2)
        texts = [ax.text(x, y, text, fontsize=6) for x, y, text in point_labels(rows)
                 if (y >= floor) == zoomed]  # each point labelled in one panel
        ax.set_xscale("log")
        ax.set_xlabel("chunk latency at batch 1, median (ms, log scale)")
        ax.set_ylim(*((floor, 1.0 + 0.04 * (1 - floor)) if zoomed else (-0.02, 1.04)))  # room for labels
        ax.grid(alpha=0.3, which="both")
        adjust_text(texts, ax=ax, expand=(1.3, 2.0), force_text=(0.3, 1.0), max_move=None,
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.4))
    axes[0].set_ylabel("success rate (95% Wilson CI)")
    axes[1].set_title(f"success >= {floor:.2f}", fontsize=9)
    n = max(r["n_episodes"] for r in rows)
    fig.suptitle(f"{task}: success vs control-loop latency ({rows[0]['policy']}, {n} episodes per point)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=7, title_fontsize=7,
               title="open markers: on fewer steps or compiled")
    out = Path(out_dir) / f"pareto_{task}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _steps(row: dict) -> int:
    """K of a step-reduction row (ddimK / flowK)."""
    return int(re.fullmatch(r"[a-z]+(\d+)", row["setting"]).group(1))


def full_calls(rows: list[dict]) -> dict[str, float]:
    """Per setting, the denoiser's FLOPs per chunk in full-call equivalents: DDIM-K's FLOPs over K is one call."""
    ref = min((r for r in rows if r["method"] in STEP_FAMILIES), key=_steps, default=None)
    if ref is None:
        raise ValueError("full-call equivalents need a step-reduction row (ddim1, flow2, ...) in the same run")
    per_call = ref["flops_per_chunk"] / _steps(ref)
    return {r["setting"]: r["flops_per_chunk"] / per_call for r in rows}


def delay_results(out_dir, task: str) -> dict[str, list[tuple[float, dict]]]:
    """Per setting, (injected delay ms, result row) from <out_dir>/delay/<task>_delay*ms.json, by delay."""
    out: dict[str, list] = {}
    for path in sorted(Path(out_dir).glob(f"delay/{task}_delay*ms.json")):
        run = json.loads(path.read_text())
        for r in run["results"]:
            out.setdefault(r["setting"], []).append((run["config"]["inference_delay_ms"], r))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def plot_calls(summary, task: str, out_dir) -> Path:
    """Success against full-call equivalents per chunk (and against injected delay when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load_rows(summary) if r["task"] == task]
    calls, delays = full_calls(rows), delay_results(out_dir, task)
    fig, axes = plt.subplots(1, 2 if delays else 1, figsize=(15 if delays else 9, 6.5), squeeze=False)
    ax = axes[0][0]
    line = sorted((r for r in rows if r["method"] in STEP_FAMILIES), key=lambda r: calls[r["setting"]])
    ax.plot([calls[r["setting"]] for r in line], [r["success_rate"] for r in line], "-", color="black", alpha=0.6,
            label="fewer steps (K steps: K full calls)")
    seen = set()
    for r in rows:
        if r["setting"] == "uncached":
            continue
        colour, marker = FAMILY_STYLE.get(r["method"].removeprefix("compile+"), ("tab:brown", "X"))
        y = r["success_rate"]
        ax.errorbar(calls[r["setting"]], y, yerr=[[max(0.0, y - r["ci_low"])], [max(0.0, r["ci_high"] - y)]],
                    fmt=marker, color=colour, alpha=0.8, capsize=2, zorder=2,
                    label=None if r["method"] in seen else r["method"])
        seen.add(r["method"])
        ax.annotate(r["setting"], (calls[r["setting"]], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    base = next((r for r in rows if r["setting"] == "uncached"), None)
    if base:
        ax.axhspan(base["ci_low"], base["ci_high"], color="grey", alpha=0.15, label="uncached 95% CI")
    ax.set_xscale("log")
    ax.set_xlabel("full-call equivalents per chunk (denoiser FLOPs / one call's, log scale)")
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    if delays:
        ax = axes[0][1]
        for setting, points in delays.items():
            xs = [d for d, _ in points]
            ys = [r["success_rate"] for _, r in points]
            lo = [y - r["ci_low"] for y, (_, r) in zip(ys, points, strict=True)]
            hi = [r["ci_high"] - y for y, (_, r) in zip(ys, points, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2, label=setting)
        ax.set_xlabel("injected inference delay (ms; the robot keeps executing the previous chunk)")
        ax.set_ylabel("success rate")
        ax.set_title("asynchronous control loop at 20 Hz", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = max(r["n_episodes"] for r in rows)
    fig.suptitle(f"{task}: success vs denoiser cost ({rows[0]['policy']}, {n} episodes per point)")
    out = Path(out_dir) / f"calls_{task}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def headline_table(rows: list[dict]) -> str:
    """Per task: uncached, then per family its fastest setting whose success is inside the uncached CI
    (or, when none is, its most successful one)."""
    lines = ["| task | setting | success (95% CI) | p50 ms | speedup | FLOPs |", "|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        base = next((r for r in mine if r["setting"] == "uncached"), None)
        picks = [base] if base else []
        for family in ("compile", *STEP_FAMILIES, "uniform", "taylorseer", "bac", "bac_taylor",
                       "diffusers_taylorseer", "diffusers_fbc", "diffusers_magcache", "compile+bac",
                       "compile+bac_taylor"):
            fam = [r for r in mine if r["method"] == family]
            if fam and base:
                ok = [r for r in fam if r["success_rate"] >= base["ci_low"]]
                picks.append(min(ok, key=lambda r: r["latency_ms_p50"]) if ok
                             else max(fam, key=lambda r: (r["success_rate"], -r["latency_ms_p50"])))
        for r in picks:
            lines.append(f"| {task} | {r['setting']} | {r['successes']}/{r['n_episodes']} "
                         f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['latency_ms_p50']:.0f} | "
                         f"{r['speedup']:.1f}x | {r['flops_ratio']:.2f} |")
    return "\n".join(lines)


def settings_table(rows: list[dict], task: str) -> str:
    """Every setting of one task, fastest first."""
    lines = ["| setting | success (95% CI) | p50 ms/chunk | p99 | speedup | FLOPs |", "|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["task"] == task), key=lambda r: r["latency_ms_p50"]):
        lines.append(f"| {r['setting']} | {r['successes']}/{r['n_episodes']} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                     f"| {r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} | {r['speedup']:.1f}x | "
                     f"{r['flops_ratio']:.2f} |")
    return "\n".join(lines)


def frontier_table(rows: list[dict]) -> str:
    """Every caching point against plain step reduction at the same latency budget: the most successful
    uncached/DDIM-K point that is no slower. Verdict by the caching point's 95% CI."""
    lines = ["| task | setting | p50 ms | success (95% CI) | best step reduction at <= this latency | its success "
             "| caching is |", "|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        line = frontier(mine)
        for r in sorted((r for r in mine if r not in line), key=lambda r: r["latency_ms_p50"]):
            within = [f for f in line if f["latency_ms_p50"] <= r["latency_ms_p50"]]
            best = max(within, key=lambda f: (f["success_rate"], -f["latency_ms_p50"]), default=None)
            if best is None:
                ref, theirs, verdict = "none as fast", "-", "faster than every step-reduction point"
            else:
                ref, theirs = f"{best['setting']} ({best['latency_ms_p50']:.0f} ms)", f"{best['success_rate']:.2f}"
                verdict = ("better" if r["ci_low"] > best["success_rate"] else
                           "worse" if r["ci_high"] < best["success_rate"] else "within CI")
            lines.append(f"| {task} | {r['setting']} | {r['latency_ms_p50']:.0f} | {r['success_rate']:.2f} "
                         f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {ref} | {theirs} | {verdict} |")
    return "\n".join(lines)


@dataclass
class ReportConfig:
    summary: str = "eval/results/summary.jsonl"
    out_dir: str = "eval/results"
    table: bool = False


@hydra_app(ReportConfig, "report")
def main(cfg: ReportConfig) -> None:
    rows = load_rows(cfg.summary)
    for task in sorted({r["task"] for r in rows}):
        print(f"wrote {plot_task(cfg.summary, task, cfg.out_dir)}")
        if any(r["task"] == task and r["method"] in STEP_FAMILIES for r in rows):
            print(f"wrote {plot_calls(cfg.summary, task, cfg.out_dir)}")
    if cfg.table:
        print(headline_table(rows))
        print()
        print(frontier_table(rows))
        for task in sorted({r["task"] for r in rows}):
            print(f"\n{task}: every setting\n" + settings_table(rows, task))


if __name__ == "__main__":
    main()
