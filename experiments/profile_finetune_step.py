"""Where a fine-tuning step's time goes: torch.profiler over a few steps of each strategy, on a model of
SmolLM2-135M's shape (or --small) with random weights and random codes (the cost does not depend on them).

    python -m experiments.profile_finetune_step --format 2x8g8 --strategies continuous,pv,ste \
        --batch-size 64 --seq-len 512 --out experiments/results/smollm2/finetune_step_profile_2x8g8.json

For each strategy: seconds per step (median between consecutive steps after the first two), and the
operators that took the most device time (CPU time on a CPU) in the profiled steps, each as a share of
the profiled wall time.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from experiments.bench_scale import SMALL, SMOLLM2_135M, quantize_randomly, random_model, sync
from llm.finetune import FinetuneConfig, finetune
from llm.formats import QuantFormat
from llm.strategies import settings_for
from pvtheory.io import write_json


def profile_strategy(student, teacher, seqs, cfg: FinetuneConfig, device, profiled: int, top: int) -> dict:
    """Run cfg.steps steps; the last `profiled` under torch.profiler. Step times and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    stamps = []
    prof_box = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def on_step(step: int, loss: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if step == cfg.steps - profiled - 1:
            prof_box["p"] = profile(activities=activities)
            prof_box["p"].__enter__()
            prof_box["t0"] = time.perf_counter()

    finetune(student, teacher, seqs, cfg, device=device, progress=False, on_step=on_step)
    sync(device)
    wall = time.perf_counter() - prof_box["t0"]
    prof = prof_box["p"]
    prof.__exit__(None, None, None)
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:])]
    use_cuda = device.type == "cuda"
    key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total_us = sum(getattr(e, key, 0) for e in events)
    ops = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 2),
            "share_of_wall": round(getattr(e, key, 0) / 1e6 / wall, 4)} for e in events[:top]]
    return {"median_step_seconds": round(statistics.median(gaps), 4), "step_seconds": [round(g, 4) for g in gaps],
            "profiled_steps": profiled, "profiled_wall_seconds": round(wall, 3),
            "device_busy_share": round(total_us / 1e6 / wall, 3), "top_ops": ops}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="2x8g8")
    ap.add_argument("--strategies", default="continuous,pv,ste")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profiled", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--small", action="store_true", help="tiny dimensions and 2 blocks: a CPU smoke test")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(SMALL, num_hidden_layers=2) if a.small else SMOLLM2_135M
    teacher = random_model(shape, shape["num_hidden_layers"], torch.float32, device)
    teacher.config.tie_word_embeddings = True
    base = copy.deepcopy(teacher)
    fmt = QuantFormat.parse(a.format)
    quantize_randomly(base, fmt)
    seqs = torch.randint(0, shape["vocab_size"], (a.batch_size * a.steps, a.seq_len),
                         generator=torch.Generator().manual_seed(0))
    res = {"what": "seconds per fine-tuning step and its top operators, random weights and codes",
           "shape": shape, "format": a.format, "batch_size": a.batch_size, "seq_len": a.seq_len,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "strategies": {}}
    for strategy in a.strategies.split(","):
        settings = settings_for(strategy, fmt, {"p_warmup": 0})  # P steps from the start: their cost is what is timed
        cfg = FinetuneConfig(strategy=strategy, settings=settings, steps=a.steps, batch_size=a.batch_size,
                             micro_batch_size=a.batch_size, v_optimizer="lamb", lr=1e-3, checkpoint_every=10**9)
        student = copy.deepcopy(base)
        res["strategies"][strategy] = r = profile_strategy(student, teacher, seqs, cfg, device, a.profiled, a.top)
        print(f"{strategy}: {r['median_step_seconds']} s/step, device busy {r['device_busy_share']:.0%}", flush=True)
        for op in r["top_ops"][:12]:
            print(f"   {op['share_of_wall']:6.1%} {op['self_ms']:9.1f} ms {op['calls']:6d}x  {op['op'][:70]}", flush=True)
        del student
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(a.out, res)


if __name__ == "__main__":
    main()
