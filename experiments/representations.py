"""The paper's comparison across representations: scalar, vector and additive codes at two bit widths.

    python -m experiments.representations formats MODEL                # which format stands for each cell
    python -m experiments.representations table OUT/*/summary.json     # the table from pipeline summaries

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
STRATEGY_ROWS = ("calibrated", "continuous", "ste", "stochastic", "linearized_pv", "pv")


def layer_shapes(model) -> list:
    """(out, in) of every linear the pipeline quantizes, from the model's config (nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm.model import block_linears, decoder_layers, read_config

    cfg = read_config(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    return [(l.out_features, l.in_features) for b in decoder_layers(m) for l in block_linears(b).values()]


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


def table(summaries: list) -> dict:
    """{width: {representation: {format, bits, rows: {strategy: ppl}}}} from pipeline summaries."""
    by_format = {s["format"]: s for s in summaries}
    out = {}
    for width, (_, _, reps) in WIDTHS.items():
        for rep, candidates in reps.items():
            s = next((by_format[f] for f in candidates if f in by_format), None)
            if s is None:
                continue
            rows = {"calibrated": s["ppl_calibrated"], **{k: r["ppl"] for k, r in s["runs"].items()}}
            out.setdefault(width, {})[rep] = {"format": s["format"], "bits": s["bits"]["bits_per_quantized_weight"],
                                              "original": s["ppl_original"], "rows": rows,
                                              "codes_changed": {k: r.get("codes_changed_total") for k, r in s["runs"].items()}}
    return out


def markdown(t: dict) -> str:
    """The table laid out like the paper's: rows strategies, columns representation x width."""
    cols = [(w, r) for w in t for r in t[w]]
    head = "| strategy | " + " | ".join(f"{r} `{t[w][r]['format']}` ({t[w][r]['bits']:.2f})" for w, r in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for row in STRATEGY_ROWS:
        vals = [t[w][r]["rows"].get(row) for w, r in cols]
        best = [min(v for k, v in t[w][r]["rows"].items() if k != "calibrated") for w, r in cols]
        lines.append(f"| {row} | " + " | ".join("" if v is None else (f"**{v:.2f}**" if v == b else f"{v:.2f}")
                                              for v, b in zip(vals, best)) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("formats", help="the format of each cell for a model")
    f.add_argument("model")
    t = sub.add_parser("table", help="the table from pipeline summaries")
    t.add_argument("summaries", nargs="+", type=Path)
    t.add_argument("--out", type=Path, help="JSON to write")
    a = ap.parse_args(argv)
    if a.cmd == "formats":
        for width, reps in choose_formats(layer_shapes(a.model)).items():
            print(width + ": " + ", ".join(f"{rep} {fmt} ({b:.3f} bits)" for rep, (fmt, b) in reps.items()))
        return
    result = table([json.loads(p.read_text()) for p in a.summaries])
    print(markdown(result))
    if a.out:
        write_json(a.out, result)


if __name__ == "__main__":
    main()
