"""Hyperparameter sweep in one process: calibration variants, then fine-tuning variants on the best one.

    python -m experiments.sweep MODEL_DIR --train T.xz --validation V.xz --out results.json --format 1x8g8 \
        --calib '{"rounds": 4}' '{"rounds": 8, "block_tune_steps": 300}' \
        --finetune '{"strategy": "continuous"}' '{"strategy": "pv", "p_lr": 1e-3}' --steps 100

Each variant is a JSON object of CalibrationConfig / FinetuneConfig fields over the defaults given on
the command line. Every variant's perplexity and time go to the JSON file as soon as it finishes
(atomic writes), so a run cut short by a time limit keeps what it measured; --budget-s skips what
would start after that many seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace

import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.finetune import FinetuneConfig, finetune
from llm.model import load_model
from llm.pipeline import evaluate, load_data
from pvtheory.io import write_json


def finetune_variant(steps: int, fmt: str, variant: dict) -> FinetuneConfig:
    """A variant's FinetuneConfig: its loop fields as given, the rest its strategy's settings (over the tuned ones
    for the format; every name checked)."""
    from dataclasses import fields

    from llm.pipeline import strategy_config

    loop_fields = {f.name for f in fields(FinetuneConfig)} - {"strategy", "settings"}
    loop = {k: v for k, v in variant.items() if k in loop_fields}
    settings = {k: v for k, v in variant.items() if k not in loop_fields | {"strategy"}}
    return strategy_config(replace(FinetuneConfig(steps=steps), **loop), variant.get("strategy", "pv"), fmt, settings)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--train", required=True)
    ap.add_argument("--validation", required=True)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--format", default="2x8g8")
    ap.add_argument("--calib", nargs="*", default=["{}"], help="CalibrationConfig overrides, one JSON object per variant")
    ap.add_argument("--finetune", nargs="*", default=[],
                    help="fine-tuning variants, one JSON object each: FinetuneConfig fields and the strategy's settings")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--nsamples", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=1e9)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    seqs, val = load_data(a.model, a.train, a.validation, a.seq_len, a.nsamples, a.eval_windows)
    teacher = load_model(a.model, torch.float32, device)
    res = {"model": a.model, "format": a.format, "nsamples": a.nsamples, "eval_windows": len(val),
           "steps": a.steps, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "ppl_original": evaluate(teacher, val, device, True), "calibration": [], "finetune": []}
    best, best_ppl = None, float("inf")
    for variant in a.calib:
        cfg = replace(CalibrationConfig(fmt=a.format), **json.loads(variant))
        if time.time() - t0 > a.budget_s:
            res["calibration"].append({"config": asdict(cfg), "skipped": "time budget"})
            continue
        student = load_model(a.model, torch.float32, "cpu")
        tc = time.time()
        report = calibrate(student, seqs, cfg, device=device, progress=False)
        row = {"overrides": json.loads(variant), "seconds": round(time.time() - tc, 1),
               "ppl": evaluate(student, val, device, True),
               "mean_final_layer_error": sum(l["relative_error"][-1] for l in report["layers"]) / len(report["layers"]),
               "block_output_mse": [round(b["output_mse"], 5) for b in report["blocks"]]}
        res["calibration"].append(row)
        print(json.dumps(row), flush=True)
        if row["ppl"] < best_ppl:
            best, best_ppl = student, row["ppl"]
        write_json(a.out, res)
    for variant in a.finetune:
        cfg = finetune_variant(a.steps, a.format, json.loads(variant))
        if best is None or time.time() - t0 > a.budget_s:
            res["finetune"].append({"overrides": json.loads(variant), "skipped": "time budget"})
            continue
        s = copy.deepcopy(best)
        rep = finetune(s, teacher, seqs, cfg, device=device, progress=False)
        losses = rep["losses"]
        row = {"overrides": json.loads(variant), "seconds": rep["seconds"], "ppl": evaluate(s, val, device, True),
               "loss_first_last10": [losses[0], sum(losses[-10:]) / len(losses[-10:])] if losses else [],
               "codes_changed_total": int(sum(rep["codes_changed"]))}
        res["finetune"].append(row)
        print(json.dumps(row), flush=True)
        del s
        write_json(a.out, res)
    res["seconds_total"] = round(time.time() - t0, 1)
    write_json(a.out, res)


if __name__ == "__main__":
    main()
