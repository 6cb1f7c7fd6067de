"""Benchmark (not a test): linearized PV on a separable quadratic with d = 10^6 and c = 16.

    python -m experiments.bench_linearized_pv [--d 1000000] [--c 16] [--iters 20] [--threads 2]

phi(x) = 1/2 sum_i w_i (x_i - t_i)^2 with weights spread over [1, 100]. Times, with the median
over repeats: the k-means initialization, one linearized P step (nearest value to x - grad/L), one
exact V step (weighted means), and a whole linearized-PV run to its fixed point; also greedy
subspace PV at tau = 1% of the coordinates. Writes experiments/results/toy/bench_linearized_pv.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from pvtheory import exact_v_step, init_scalar, linearized_p_step, pv, random_problem, subspace_p_step
from pvtheory.io import write_json

RESULTS = Path(__file__).parent / "results" / "toy"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of fn() over `repeats` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=10**6)
    ap.add_argument("--c", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50, help="iteration cap of the PV runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_linearized_pv.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    phi = random_problem("separable", args.d, cond=100.0, seed=0)
    t_init, x0 = timed(lambda: init_scalar(phi.t, args.c), 1)
    p_step, v_step = linearized_p_step(), exact_v_step()
    t_p, after_p = timed(lambda: p_step.update(x0, phi, None)[0], args.repeats)
    t_v, _ = timed(lambda: v_step.update(after_p, phi, None)[0], args.repeats)
    t_run, run = timed(lambda: pv(phi, x0, p_step, v_step, max_iters=args.iters), 1)
    tau = max(1, args.d // 100)
    t_sub, sub = timed(lambda: pv(phi, x0, subspace_p_step(tau, "greedy"), v_step, max_iters=args.iters), 1)
    result = {
        "command": "python -m experiments.bench_linearized_pv " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__},
        "problem": {"kind": "separable quadratic, w in [1, 100]", "d": args.d, "c": args.c, "dtype": "float64"},
        "seconds": {
            "kmeans_init": round(t_init, 4),
            "linearized_p_step": round(t_p, 4),
            "exact_v_step": round(t_v, 4),
            "pv_iteration": round(t_p + t_v, 4),
            "linearized_pv_run": round(t_run, 3),
            "greedy_subspace_pv_run": round(t_sub, 3),
        },
        "linearized_pv": {**run.summary(), "phi_init": run.trace[0]["phi"],
                          "codes_changed_per_iteration": run.changed().tolist()},
        "greedy_subspace_pv": {"tau": tau, **sub.summary(), "phi_init": sub.trace[0]["phi"]},
        "coordinates_per_second_per_iteration": round(args.d / (t_p + t_v)),
    }
    write_json(args.out, result)
    s = result["seconds"]
    print(f"d = {args.d:,}, c = {args.c}, {args.threads} threads")
    print(f"  k-means init           {s['kmeans_init']:8.3f} s")
    print(f"  linearized P step      {s['linearized_p_step']:8.3f} s")
    print(f"  exact V step           {s['exact_v_step']:8.3f} s")
    print(f"  one PV iteration       {s['pv_iteration']:8.3f} s  ({result['coordinates_per_second_per_iteration']:,} coordinates/s)")
    print(f"  linearized PV run      {s['linearized_pv_run']:8.3f} s  ({run.iterations} iterations, {run.stop_reason}, "
          f"phi {run.trace[0]['phi']:.6g} -> {run.phi:.6g})")
    print(f"  greedy subspace PV run {s['greedy_subspace_pv_run']:8.3f} s  (tau = {tau}, {sub.iterations} iterations, "
          f"{sub.stop_reason}, phi -> {sub.phi:.6g})")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
