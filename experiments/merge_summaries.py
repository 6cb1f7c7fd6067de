"""Merge the per-strategy pipeline summaries of experiments/gpu_pipeline.sh into one JSON per model.

    python -m experiments.merge_summaries RUNS_DIR MODEL_NAME OUT.json   (RUNS_DIR/MODEL-FORMAT-STRATEGY/summary.json)
    python -m experiments.merge_summaries --table OUT.json               (print it as a table)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pvtheory.io import write_json


def merge(runs_dir: Path, model: str) -> dict:
    """{format: {bits, ppl_original, ppl_calibrated, calibration_seconds, calibration, runs: {strategy: run}}}."""
    formats: dict = {}
    for path in sorted(runs_dir.glob(f"{model}-*/summary.json")):
        s = json.loads(path.read_text())
        entry = formats.setdefault(s["format"], {"runs": {}})
        for key in ("bits", "ppl_original", "ppl_calibrated", "calibration_seconds", "calibration", "nsamples",
                    "seq_len", "eval_windows", "device"):
            if key in s and (key not in entry or path.parent.name.endswith("-continuous")):
                entry[key] = s[key]
        for strategy, run in s.get("runs", {}).items():
            entry["runs"][strategy] = {k: v for k, v in run.items() if k != "losses"} | {
                "losses_every_10": run["losses"][::10]}
    return {"model": model, "formats": formats}


def table(merged: dict) -> str:
    lines = [f"{merged['model']}"]
    for fmt, e in merged["formats"].items():
        bits = e.get("bits", {}).get("bits_per_quantized_weight", float("nan"))
        lines.append(f"  {fmt} ({bits:.3f} b/w): original {e.get('ppl_original', float('nan')):.2f}, "
                     f"calibrated {e.get('ppl_calibrated', float('nan')):.2f} ({e.get('calibration_seconds')} s)")
        for name, r in e["runs"].items():
            lines.append(f"    {name:14s} {r['ppl']:.2f}  ({r['steps']} steps, {r['seconds']} s, "
                         f"{r['codes_changed_total']} code changes)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    else:
        write_json(sys.argv[3], merge(Path(sys.argv[1]), sys.argv[2]))
