"""Quality against GPU time: one pipeline rerun with more --steps into the same --out (each longer run continues
the shorter one from its checkpoint: fresh data for the longest budget is drawn by --ft-nsamples), its summary
kept after each budget; this script turns those summaries into one JSON and a plot of perplexity against minutes.

    pvtuning pipeline MODEL ... --out RUN --steps 80 --ft-nsamples 38400 && cp RUN/summary.json steps_80.json
    pvtuning pipeline MODEL ... --out RUN --steps 280 --ft-nsamples 38400 && cp RUN/summary.json steps_280.json
    python -m experiments.budget_curve steps_80.json steps_280.json --gpu "NVIDIA H100 80GB HBM3" \
        --out experiments/results/smollm2/budget_2x8g8.json

A strategy's minutes at a budget are its whole pipeline's: calibration plus its fine-tuning steps (evaluation and
the other strategies' runs left out, so every strategy is charged only for what it needs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.plots import LABELS, STYLE  # noqa: E402
from pvtheory.io import save_figure, write_json  # noqa: E402


def budget_points(summaries: list[dict]) -> dict:
    """{strategy: [{steps, minutes, ppl, codes_changed, seconds_per_step}]} over the summaries, by steps."""
    points: dict = {}
    for s in sorted(summaries, key=lambda s: next(iter(s["runs"].values()))["steps"]):
        for name, r in s["runs"].items():
            points.setdefault(name, []).append({
                "steps": r["steps"], "tokens": r["steps"] * r["config"]["batch_size"] * s["seq_len"],
                "minutes": round((s["calibration_seconds"] + r["seconds"]) / 60, 2), "ppl": r["ppl"],
                "ppl_increase": r["ppl"] / s["ppl_original"] - 1, "codes_changed": r["codes_changed_total"],
                "seconds_per_step": r["seconds_per_step"]})
    return points


def plot_budget(result: dict, path) -> None:
    """Perplexity against whole-pipeline minutes, one line per strategy, the original and the target beside."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in result["strategies"].items():
        ax.plot([p["minutes"] for p in pts], [p["ppl"] for p in pts], label=LABELS.get(name, name),
                **STYLE.get(name, {}))
    ax.axhline(result["ppl_original"], color="k", lw=1, label=f"original ({result['ppl_original']:.2f})")
    if result.get("target_ppl"):
        ax.axhline(result["target_ppl"], color="k", lw=1, ls=":", label=f"target ({result['target_ppl']:.2f})")
    ax.set_xlabel(f"minutes, calibration + fine-tuning ({result['gpu']})")
    ax.set_ylabel("validation perplexity (512 tokens)")
    ax.set_title(f"{result['model']} {result['format']}: quality against GPU time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summaries", nargs="+", help="the pipeline's summary.json after each budget")
    ap.add_argument("--gpu", required=True, help="the GPU the runs had (one process at a time)")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--target-increase", type=float, default=None, help="e.g. 0.2: a line at 1.2 x the original")
    ap.add_argument("--out", required=True, help="the JSON; the plot goes beside it (.png)")
    a = ap.parse_args(argv)
    summaries = [json.loads(Path(p).read_text()) for p in a.summaries]
    first = summaries[0]
    if len({s["calibration_seconds"] for s in summaries}) != 1 or len({s["ppl_calibrated"] for s in summaries}) != 1:
        raise SystemExit("the summaries come from different calibrations: give the budgets of one --out")
    result = {
        "what": "validation perplexity against whole-pipeline GPU minutes (calibration + the strategy's fine-tuning), "
                "one calibration, each longer budget continuing the shorter from its checkpoint",
        "model": a.model_name, "format": first["format"], "gpu": a.gpu,
        "eval_windows": first["eval_windows"], "seq_len": first["seq_len"], "nsamples": first["nsamples"],
        "ft_nsamples": first["ft_nsamples"], "calibration": first["calibration"],
        "configs": {n: r["config"] for n, r in first["runs"].items()},  # each strategy as it ran (steps aside)
        "strategy_settings": first["strategy_settings"],
        "ppl_original": first["ppl_original"], "ppl_calibrated": first["ppl_calibrated"],
        "calibration_seconds": first["calibration_seconds"],
        "target_ppl": first["ppl_original"] * (1 + a.target_increase) if a.target_increase else None,
        "strategies": budget_points(summaries),
        "losses_longest": {n: r["losses"] for n, r in max(summaries, key=lambda s: next(iter(s["runs"].values()))["steps"])["runs"].items()},
        "peak_gpu_gib": first["peak_gpu_gib"],
    }
    write_json(a.out, result)
    plot_budget(result, Path(a.out).with_suffix(".png"))
    for name, pts in result["strategies"].items():
        print(name, [(p["steps"], p["minutes"], round(p["ppl"], 3)) for p in pts])


if __name__ == "__main__":
    main()
