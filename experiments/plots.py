"""Plots of the LLM results, from the pipeline's summary JSONs.

    python -m experiments.plots main-table experiments/results/main_table/*.json --out main_table.png
    python -m experiments.plots curves experiments/results/main_table/ref-llama_1x8g8.json --out curves.png

    python -m experiments.plots representations experiments/results/representations/table_*.json --out representations.png

main-table: validation perplexity against bits per quantized weight, one line per strategy, one panel
per model (several files of one model and format are merged; a strategy's first value wins).
curves: the KL loss and the code groups changed at every fine-tuning step, one line per strategy.
representations: from the tables of experiments.representations, every strategy against continuous-only
(on the same calibrations) per representation and width, one panel per model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from experiments.representations import STRATEGY_ROWS  # noqa: E402
from pvtheory.io import save_figure  # noqa: E402

ORDER = STRATEGY_ROWS  # the rows of the paper's table, in its order
LABELS = {"calibrated": "calibrated only", "continuous": "continuous only (V)", "ste": "STE",
          "stochastic": "stochastic rounding", "linearized_pv": "linearized PV", "pv": "PV-Tuning",
          "pv_warmup": "PV-Tuning, P warm-up"}
STYLE = {"pv": dict(color="C3", lw=2.2, marker="o"), "ste": dict(color="C0", marker="s"),
         "continuous": dict(color="C2", marker="^"), "stochastic": dict(color="C4", marker="v", ls=":"),
         "linearized_pv": dict(color="C1", marker="D", ls=":"), "calibrated": dict(color="0.5", marker="x", ls="--"),
         "pv_warmup": dict(color="C5", lw=2.2, marker="o", ls="--")}


def model_name(summary: dict) -> str:
    return Path(summary["model"]).name.removesuffix(".gguf")


def merge(summaries: Sequence[dict]) -> dict:
    """{model: {bits: {strategy or "calibrated" or "original": perplexity}}} over every summary."""
    table: dict = {}
    for s in summaries:
        cell = table.setdefault(model_name(s), {}).setdefault(round(s["bits"]["bits_per_quantized_weight"], 3), {})
        cell.setdefault("original", s["ppl_original"])
        cell.setdefault("calibrated", s["ppl_calibrated"])
        for strategy, run in s.get("runs", {}).items():
            cell.setdefault(strategy, run["ppl"])
    return table


def plot_main_table(summaries: Sequence[dict], path) -> None:
    """Perplexity against bits per quantized weight for each strategy, a panel per model."""
    table = merge(summaries)
    fig, axes = plt.subplots(1, len(table), figsize=(5.2 * len(table), 4.2), squeeze=False)
    for ax, (model, by_bits) in zip(axes[0], sorted(table.items())):
        bits = sorted(by_bits)
        for strategy in ORDER:
            pts = [(b, by_bits[b][strategy]) for b in bits if strategy in by_bits[b]]
            if pts:
                ax.plot(*zip(*pts), label=LABELS[strategy], **STYLE[strategy])
        ax.axhline(by_bits[bits[0]]["original"], color="k", lw=1, ls="--", label="original (16 bits)")
        ax.set(title=model, xlabel="bits per quantized weight", ylabel="validation perplexity (512 tokens)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_curves(summary: dict, path, smooth: int = 10) -> None:
    """KL per step (moving average of `smooth` steps) and code groups changed per step, per strategy."""
    fig, (kl, codes) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in ORDER:
        run = summary.get("runs", {}).get(strategy)
        if run is None:
            continue
        losses = run["losses"]
        avg = [sum(losses[max(0, i - smooth + 1): i + 1]) / len(losses[max(0, i - smooth + 1): i + 1])
               for i in range(len(losses))]
        style = {k: v for k, v in STYLE[strategy].items() if k != "marker"}
        kl.plot(avg, label=f"{LABELS[strategy]} ({run['ppl']:.2f})", **style)
        if strategy != "continuous":
            codes.plot(run["codes_changed"], label=LABELS[strategy], **style)
    kl.set(title=f"{model_name(summary)} {summary['format']}: KL to the original",
           xlabel="fine-tuning step", ylabel=f"KL (moving average of {smooth})")
    kl.set_yscale("log")
    codes.set(title="code groups changed per step", xlabel="fine-tuning step", ylabel="groups")
    codes.set_yscale("symlog", linthresh=10)
    for ax in (kl, codes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x)


def vs_continuous(cell: dict) -> dict:
    """{strategy: ([percent over continuous-only's perplexity, one per calibration both ran on], False)} for a
    column of experiments.representations.table; a strategy that never ran beside continuous-only gets
    ([its mean over continuous-only's mean], True)."""
    rows, paired = cell["rows"], cell["vs_continuous"]
    base = rows["continuous"]["mean"]
    return {s: (paired[s], False) if paired.get(s) else ([100 * (rows[s]["mean"] / base - 1)], True)
            for s in rows if s not in ("calibrated", "continuous")}


def plot_representations(tables: dict, path, clip: float = 8.0) -> None:
    """Each fine-tuning strategy's perplexity against continuous-only's on the same calibration (percent:
    below zero the strategy's discrete updates helped; bars at the means over calibrations, lines from the
    lowest to the highest, continuous-only's own spread over calibrations in green, left of each group), one group per
    column (representation x width) and a panel per model. PV-Tuning with and without the P warm-up are two
    bars. A strategy never run beside continuous-only is hatched, compared through the means. tables:
    {model: experiments.representations.table(...)}. Bars past +-`clip` percent are cut there and labelled."""
    strategies = [s for s in ORDER if s not in ("calibrated", "continuous")]
    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.4 * len(tables)), squeeze=False)
    width = 0.8 / len(strategies)

    def cut(v: float) -> float:
        return max(min(v, clip), -clip)

    for ax, (model, t) in zip(axes[:, 0], tables.items()):
        lowest, highest = -2.0, 2.0
        cols = [(w, r) for w in t for r in t[w] if "continuous" in t[w][r]["rows"]]
        for i, (w, r) in enumerate(cols):
            rows = t[w][r]["rows"]
            base = rows["continuous"]["mean"]
            ax.plot([i - 0.43] * 2, [100 * (rows["continuous"]["min"] / base - 1),
                                     100 * (rows["continuous"]["max"] / base - 1)], color="C2", lw=3)
            bars = vs_continuous(t[w][r])
            for k, s in enumerate(strategies):
                if s not in bars:
                    continue
                pct, through_means = bars[s]
                hatch = "//" if through_means else None
                x = i - 0.4 + width * (k + 0.5)
                mean, lo, hi = _mean(pct), min(pct), max(pct)
                ax.bar(x, cut(mean), width, color=STYLE[s]["color"], hatch=hatch, edgecolor="w" if hatch else None)
                if hi > lo:
                    ax.plot([x, x], [cut(lo), cut(hi)], color="k", lw=1)
                if abs(mean) > clip:
                    ax.text(x, cut(mean), f"{mean:.0f}%", ha="center", va="bottom" if mean > 0 else "top",
                            fontsize=7, rotation=90)
                lowest, highest = min(lowest, cut(lo)), max(highest, cut(hi))
        ax.axhline(0, color="C2", lw=1.5)
        ax.set_xticks(range(len(cols)), [f"{r} {t[w][r]['format']}\n{w} ({t[w][r]['bits']:.2f})" for w, r in cols],
                      fontsize=8)
        ax.set(title=model, ylabel="perplexity vs continuous-only (%)", ylim=(lowest * 1.3, highest * 1.3))
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color="C2", lw=1.5, label="continuous only (V)")]
    handles += [Patch(color=STYLE[s]["color"], label=LABELS[s]) for s in strategies]
    handles.append(Patch(facecolor="0.6", hatch="//", edgecolor="w", label="never beside continuous-only: the means"))
    fig.legend(handles=handles, fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.2 / len(tables)))
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("main-table", "curves", "representations"), help="which plot")
    ap.add_argument("summaries", nargs="+",
                    help="pipeline summary JSONs (curves: one); representations: tables named table_MODEL.json")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args(argv)
    summaries = [json.loads(Path(f).read_text()) for f in a.summaries]
    if a.what == "representations":
        plot_representations({Path(f).stem.removeprefix("table_"): t for f, t in zip(a.summaries, summaries)}, a.out)
    elif a.what == "main-table":
        plot_main_table(summaries, a.out)
    else:
        plot_curves(summaries[0], a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
