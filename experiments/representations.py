"""The paper's comparison across representations: scalar, vector and additive codes at two bit widths.

    python -m experiments.representations formats MODEL                # which format stands for each cell
    python -m experiments.representations table OUT/*/summary.json     # the table from pipeline summaries
    python -m experiments.representations merge A/summary.json B/summary.json --out AB.json

A cell's runs may come from several calibrations (seeds): the table gives each strategy's mean and range
over them, and PV-Tuning against the best other strategy on the same calibrations. `merge` joins the
summaries of pipelines that fine-tuned copies of one calibrated checkpoint (strategies run in parallel).

For each representation and width the format is the one of its candidates whose total bits per
quantized weight (codes, codebooks, scales, zeros: llm.formats) on this model's layers are nearest the
width's target, among those whose groups divide every layer. `python -m experiments.reproduce
representations` runs the pipelines (the 2x8g8 recipe at about 2 bits, the 1x8g8 recipe at about 1.5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pvtheory.io import write_json

WIDTHS = {  # width -> (target bits, preset, {representation: candidate formats})
    "about 2 bits": (2.2, "2x8g8", {
        "scalar": ["int2g64", "int2g96", "int2g128", "int2g192", "int2g256"],
        "vector": ["vq8g4", "vq9g4", "vq10g6"],
        "additive": ["2x8g8"]}),
    "about 1.5 bits": (1.5, "1x8g8", {
        "scalar": ["int1g32", "int1g64", "int1g96", "int1g128"],
        "vector": ["vq9g8", "vq10g8", "vq11g8", "vq8g6"],
        "additive": ["2x6g8", "2x5g8", "2x7g8"]}),
}
STRATEGY_ROWS = ("calibrated", "continuous", "ste", "stochastic", "linearized_pv", "pv", "pv_warmup")
PV_ROWS = ("pv", "pv_warmup")  # PV-Tuning without and with a P warm-up: two rows, never pooled


def row_of(strategy: str, run: dict) -> str:
    """The table row of one fine-tuning run: PV-Tuning whose P steps waited for a warm-up (`--p-warmup N`,
    the default on codebook formats) is a row of its own, beside PV-Tuning without one."""
    cfg = run.get("config") or {}
    settings = cfg.get("settings") or cfg  # summaries before strategies owned their settings kept them flat
    return "pv_warmup" if strategy == "pv" and settings.get("p_warmup", 0) else strategy


def layer_shapes(model) -> list:
    """(out, in) of every linear the pipeline quantizes, from the model's config (nothing loaded)."""
    from llm.model import linear_shapes

    return list(linear_shapes(model).values())


def bits(fmt: str, shapes: list) -> float | None:
    """Bits per quantized weight of `fmt` on these layers, None if its groups do not divide one."""
    from llm.formats import QuantFormat

    q = QuantFormat.parse(fmt)
    if any(i % q.group_size for _, i in shapes):
        return None
    n = sum(o * i for o, i in shapes)
    return sum(q.bits_per_weight(o, i) * o * i for o, i in shapes) / n


def choose_formats(shapes: list) -> dict:
    """{width: {representation: (format, bits)}}: the candidate nearest the width's target."""
    out = {}
    for width, (target, _, reps) in WIDTHS.items():
        out[width] = {}
        for rep, candidates in reps.items():
            valid = [(f, b) for f in candidates if (b := bits(f, shapes)) is not None]
            if not valid:
                raise ValueError(f"no {rep} format of {width} divides this model's layers: {candidates}")
            out[width][rep] = min(valid, key=lambda fb: (abs(fb[1] - target), fb[1]))
    return out


def merge(summaries: list) -> dict:
    """One summary from pipeline summaries that fine-tuned the same calibrated checkpoint: same model,
    format, calibration settings and calibrated perplexity; each table row (`row_of`) in one of them only."""
    first = summaries[0]
    same = ("model", "format", "calibration", "ppl_calibrated", "ppl_original", "eval_windows", "ft_nsamples")
    out = {k: v for k, v in first.items() if k not in ("runs", "strategy_settings", "seconds_total", "continuations")}
    out["runs"], out["strategy_settings"] = {}, {}
    for s in summaries:
        for k in same:
            a, b = s.get(k), first.get(k)
            if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * abs(b)):
                raise ValueError(f"summaries of different calibrations cannot merge: {k} {s.get(k)!r} != {first.get(k)!r}")
        for name, run in s["runs"].items():
            row = row_of(name, run)
            if row in out["runs"]:
                raise ValueError(f"strategy {row!r} is in two of the summaries")
            out["runs"][row] = run
            if name in s.get("strategy_settings", {}):
                out["strategy_settings"][row] = s["strategy_settings"][name]
    return out


def _stats(values: list) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "runs": values}


def table(summaries: list) -> dict:
    """{width: {representation: {format, bits, original, rows: {strategy: {mean, min, max, runs}},
    codes_changed: {strategy: mean}, pv_vs_best_other: {strategy, percent: [...]}}}} from pipeline
    summaries; a format's summaries (one per calibration) are pooled. pv_vs_best_other compares PV-Tuning
    with the other strategy of lowest mean, calibration by calibration (percent of its perplexity);
    pv_warmup_vs_best_other the same for PV-Tuning with a P warm-up (row `pv_warmup`, see `row_of`)."""
    by_format: dict = {}
    for s in summaries:
        by_format.setdefault(s["format"], []).append(s)
    out = {}
    for width, (_, _, reps) in WIDTHS.items():
        for rep, candidates in reps.items():
            fmt = next((f for f in candidates if f in by_format), None)
            if fmt is None:
                continue
            group = [{**s, "runs": {row_of(k, r): r for k, r in s["runs"].items()}} for s in by_format[fmt]]
            values = {"calibrated": [s["ppl_calibrated"] for s in group]}
            codes: dict = {}
            for s in group:
                for k, r in s["runs"].items():
                    values.setdefault(k, []).append(r["ppl"])
                    codes.setdefault(k, []).append(r.get("codes_changed_total") or 0)
            rows = {k: _stats(v) for k, v in values.items()}
            cell = {"format": fmt, "bits": group[0]["bits"]["bits_per_quantized_weight"],
                    "original": group[0]["ppl_original"], "rows": rows,
                    "codes_changed": {k: round(sum(v) / len(v)) for k, v in codes.items()}}
            cell["vs_pv"] = _versus(group, "pv")
            if "pv_warmup" in rows:
                cell["vs_pv_warmup"] = _versus(group, "pv_warmup")
            cell["vs_continuous"] = _versus(group, "continuous")
            for pv in PV_ROWS:  # against the best of the other strategies run on its calibrations
                others = {k: v for k, v in cell.get(f"vs_{pv}", {}).items() if k not in PV_ROWS}
                if others:
                    best = min(others, key=lambda k: sum(others[k]) / len(others[k]))
                    paired = [100 * (s["runs"][pv]["ppl"] / s["runs"][best]["ppl"] - 1) for s in group
                              if pv in s["runs"] and best in s["runs"]]
                    cell[f"{pv}_vs_best_other"] = {"strategy": best, "percent": [round(x, 2) for x in paired]}
            out.setdefault(width, {})[rep] = cell
    return out


def _versus(group: list, base: str) -> dict:
    """{strategy: [percent of its perplexity over `base`'s, on each calibration where both ran]}."""
    out: dict = {}
    for s in group:
        if base in s["runs"]:
            for k, r in s["runs"].items():
                if k != base:
                    out.setdefault(k, []).append(round(100 * (r["ppl"] / s["runs"][base]["ppl"] - 1), 2))
    return out


def count(n: float) -> str:
    """A number of codes as a table prints it: 3.12M, 21.7k, 351."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def markdown(t: dict) -> str:
    """The table laid out like the paper's: rows strategies, columns representation x width; a cell with
    several calibrations gives the mean and (range, number of runs); the best mean in bold; a row that no
    column has is left out."""
    cols = [(w, r) for w in t for r in t[w]]
    head = "| strategy | " + " | ".join(f"{r} `{t[w][r]['format']}` ({t[w][r]['bits']:.2f})" for w, r in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]

    def fmt(c: dict, best: float) -> str:
        v = f"{c['mean']:.2f}"
        v = f"**{v}**" if c["mean"] == best else v
        return v if len(c["runs"]) == 1 else f"{v} ({c['min']:.2f}-{c['max']:.2f}, {len(c['runs'])})"

    best = [min(c["mean"] for k, c in t[w][r]["rows"].items() if k in STRATEGY_ROWS and k != "calibrated")
            for w, r in cols]
    for row in STRATEGY_ROWS:
        cells = [t[w][r]["rows"].get(row) for w, r in cols]
        if not any(cells):
            continue
        lines.append(f"| {row} | " + " | ".join("" if c is None else fmt(c, b) for c, b in zip(cells, best)) + " |")
    def mean_pct(x: list) -> str:
        return f"{sum(x) / len(x):+.1f}%"

    def diff(cell: dict, pv: str) -> str:
        p = cell.get(f"{pv}_vs_best_other")
        if not p or not p["percent"]:
            return ""
        x = p["percent"]
        text = f"{mean_pct(x)} vs {p['strategy']}" + (f" ({min(x):+.1f} to {max(x):+.1f}, {len(x)})" if len(x) > 1 else "")
        vc = cell.get("vs_continuous", {})
        unpaired = [k for k in cell["rows"] if k in vc and k not in cell[f"vs_{pv}"] and k not in PV_ROWS]
        if unpaired and pv in vc:  # run on other calibrations only: through continuous, which every calibration has
            text += "; not on PV's calibrations, each vs continuous on its own: PV " + mean_pct(vc[pv]) + ", " + \
                ", ".join(f"{k} {mean_pct(vc[k])}" for k in unpaired)
        return text

    for pv, label in (("pv", "PV-Tuning"), ("pv_warmup", "PV-Tuning with the P warm-up")):
        diffs = [diff(t[w][r], pv) for w, r in cols]
        if any(diffs):
            lines.append(f"| {label} vs the best other, same calibration | " + " | ".join(diffs) + " |")
    changed = [t[w][r]["codes_changed"] for w, r in cols]
    if any("pv" in c and "ste" in c for c in changed):
        lines.append("| codes changed by PV / STE (mean) | " + " | ".join(
            f"{count(c['pv'])} / {count(c['ste'])}" if "pv" in c and "ste" in c else "" for c in changed) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("formats", help="the format of each cell for a model")
    f.add_argument("model")
    t = sub.add_parser("table", help="the table from pipeline summaries")
    t.add_argument("summaries", nargs="+", type=Path)
    t.add_argument("--out", type=Path, help="JSON to write")
    m = sub.add_parser("merge", help="one summary from pipelines that fine-tuned one calibrated checkpoint")
    m.add_argument("summaries", nargs="+", type=Path)
    m.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "formats":
            for width, reps in choose_formats(layer_shapes(a.model)).items():
                print(width + ": " + ", ".join(f"{rep} {fmt} ({b:.3f} bits)" for rep, (fmt, b) in reps.items()))
            return
        summaries = [read_summary(p) for p in a.summaries]
        if a.cmd == "merge":
            write_json(a.out, merge(summaries))
            return
        result = table(summaries)
    except (ValueError, OSError) as e:
        ap.exit(1, f"error: {e}\n")
    print(markdown(result))
    if a.out:
        write_json(a.out, result)


def read_summary(path: Path) -> dict:
    """A pipeline's summary.json; a clear error for anything else."""
    try:
        s = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg})") from None
    if not isinstance(s, dict) or not {"format", "ppl_calibrated", "runs"} <= set(s):
        raise ValueError(f"{path} is not a pipeline summary (needs format, ppl_calibrated and runs)")
    return s


if __name__ == "__main__":
    main()
