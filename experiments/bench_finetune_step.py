"""Seconds per fine-tuning step, per strategy, from one calibrated checkpoint, with the format's preset.

    python experiments/bench_finetune_step.py CHECKPOINT --model MODEL --train TRAIN \
        --strategies pv,ste --steps 60 --label after --out runs/step_time.json

Every strategy runs `--steps` steps of the same recipe (`pvtuning pipeline --preset auto` with the
tuned P-step settings) on the same batches; the time of a step is taken between consecutive calls
of finetune's on_step (the first `--skip` steps, which include warm-up, are left out). Run as a
script, the `llm` package comes from PYTHONPATH: timing two versions of the code is two runs with
PYTHONPATH pointing at each; the JSON of both can be merged with --merge.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def time_strategy(student, teacher, seqs, cfg, device, skip: int) -> dict:
    """Seconds per step (median and mean after `skip` steps) and the losses of one run."""
    from llm.finetune import finetune

    stamps = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def on_step(step: int, loss: float) -> None:
        sync()
        stamps.append(time.perf_counter())

    rep = finetune(student, teacher, seqs, cfg, device=device, progress=False, on_step=on_step)
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    return {"steps": cfg.steps, "timed_steps": len(gaps), "median_step_seconds": round(statistics.median(gaps), 4),
            "mean_step_seconds": round(statistics.fmean(gaps), 4), "losses": rep["losses"],
            "codes_changed": rep["codes_changed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="a calibrated checkpoint")
    ap.add_argument("--model", help="the original model")
    ap.add_argument("--train", help="train text")
    ap.add_argument("--strategies", default="pv,ste")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--label", default="current", help="the name of this version of the code in the JSON")
    ap.add_argument("--out", required=True, help="JSON to write (or, with --merge, to merge into)")
    ap.add_argument("--merge", nargs="*", help="merge these JSON files into --out instead of running")
    a = ap.parse_args()
    if a.merge:
        merged = {}
        for f in a.merge:
            for fmt, entry in json.loads(Path(f).read_text()).items():
                merged.setdefault(fmt, {}).update(entry)
        Path(a.out).write_text(json.dumps(merged, indent=1))
        return

    from llm.checkpoint import load_checkpoint, read_meta
    from llm.finetune import FinetuneConfig
    from llm.model import load_model
    from dataclasses import replace

    from llm.formats import QuantFormat
    from llm.pipeline import train_sequences
    from llm.strategies import settings_for
    from llm.presets import preset_for, preset_strategy_settings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_meta(a.checkpoint)
    fmt = next(iter(meta["quantized_layers"].values()))
    p = preset_for(fmt)
    preset_settings = preset_strategy_settings(p, fmt)
    base = FinetuneConfig(steps=a.steps, batch_size=p["batch_size"], micro_batch_size=p["micro_batch_size"],
                          lr=p["lr"], v_optimizer=p["v_optimizer"], checkpoint_every=10**9)
    seqs = train_sequences(a.model, a.train, a.seq_len, a.steps * base.batch_size, seed=1)
    teacher = load_model(a.model, torch.float32, device)
    out = {}
    for strategy in a.strategies.split(","):
        student, _, _ = load_checkpoint(a.checkpoint, a.model, device)
        settings = settings_for(strategy, QuantFormat.parse(fmt), preset_settings.get(strategy), {"p_warmup": 0})
        cfg = replace(base, strategy=strategy, settings=settings).validate()  # every step re-encodes
        out[strategy] = time_strategy(student, teacher, seqs, cfg, device, a.skip)
        print(f"{a.label} {fmt} {strategy}: {out[strategy]['median_step_seconds']} s/step", flush=True)
        del student
    Path(a.out).write_text(json.dumps({fmt: {a.label: {"device": torch.cuda.get_device_name() if device.type == "cuda"
                                                         else "cpu", "strategies": out}}}, indent=1))


if __name__ == "__main__":
    main()
