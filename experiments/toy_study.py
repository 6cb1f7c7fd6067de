"""The toy convergence study: PV variants against STE, stochastic rounding and relax-then-round.

    python -m experiments.toy_study [--full] [--out experiments/results/toy]

By default a quick run (5 seeds, under a minute on 2 cores) that writes to a scratch folder; --full
runs the 20 seeds of the published study (about 2.5 minutes) into experiments/results/toy.

Three parts, every method started from the same point (1-D k-means of the continuous optimum):
1. phi against iterations on least-squares and quadratic problems (d = 64, c = 4, cond = 100);
2. the optimality gap against c on tiny least-squares problems (d = 10) whose global optimum is
   found by enumerating all partitions;
3. the effect of tau (subspace size) for random and greedy subspaces.
phi is reported normalized, (phi - phi_cont) / (phi_init - phi_cont): 1 is the k-means rounding
of the continuous optimum, 0 the continuous optimum itself (unreachable with c values).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pvtheory import (accumulated, continuous_optimum, exact_p_step, exact_v_step, global_optimum, init_scalar,
                      linearized_p_step, pv, random_problem, relax_then_round, ste_p_step,
                      stochastic_rounding_p_step, subspace_p_step)
from pvtheory.io import save_figure, write_json

RESULTS = Path(__file__).parent / "results" / "toy"
QUICK = Path("runs") / "toy_quick"
MAX_ITERS = 300


def methods(taus=(1, 4, 16)) -> dict:
    """name -> (P step factory, stop tolerance); every method uses the exact V step."""
    out = {
        "exact PV": (lambda s: exact_p_step(), None),
        "linearized PV": (lambda s: linearized_p_step(), None),
    }
    for tau in taus:
        out[f"greedy subspace PV (tau={tau})"] = (lambda s, t=tau: subspace_p_step(t, "greedy"), None)
        out[f"random subspace PV (tau={tau})"] = (lambda s, t=tau: subspace_p_step(t, "random", seed=s), 1e-12)
    for tau in (1, 4):  # the rounding residual carried to the next P step (the LLM scalar grid's default)
        out[f"greedy subspace PV with memory 1 (tau={tau})"] = (lambda s, t=tau: accumulated(subspace_p_step(t, "greedy"), 1.0), None)
    out["STE"] = (lambda s: ste_p_step(), None)
    out["stochastic rounding"] = (lambda s: stochastic_rounding_p_step(seed=s), None)
    return out


def run_method(phi, x0, p_factory, tol, seed):
    """One PV-loop run; stochastic/random methods stop after 30 iterations without progress."""
    return pv(phi, x0, p_factory(seed), exact_v_step(), max_iters=MAX_ITERS, tol=tol, patience=30)


def normalized(phi_values, phi_init, phi_cont):
    return (np.asarray(phi_values) - phi_cont) / max(phi_init - phi_cont, 1e-300)


def padded(trace: np.ndarray, length: int) -> np.ndarray:
    """Extend a trace that stopped early with its last value (it stays there)."""
    return np.concatenate([trace, np.full(length - len(trace), trace[-1])])


def part_convergence(seeds: int, d: int, c: int, cond: float) -> dict:
    """Part 1: traces and final phi of every method on least squares and quadratics."""
    out = {}
    for kind in ("least_squares", "quadratic"):
        table = {name: {"final": [], "best": [], "iterations": [], "stop": [], "traces": []} for name in methods()}
        table["relax-then-round"] = {"final": [], "best": [], "iterations": [], "stop": [], "traces": []}
        for seed in tqdm(range(seeds), desc=f"convergence {kind}", leave=False):
            phi = random_problem(kind, d, cond=cond, seed=seed)
            xc = continuous_optimum(phi)
            x0 = init_scalar(xc, c)
            phi_cont, phi_init = float(phi.value(xc)), float(phi.value(x0.decode()))
            rtr = relax_then_round(phi, c)
            r = table["relax-then-round"]
            val = float(normalized(rtr.phi_refined, phi_init, phi_cont))
            r["final"].append(val), r["best"].append(val), r["iterations"].append(0), r["stop"].append("closed_form")
            r["traces"].append(np.full(MAX_ITERS + 1, val))
            for name, (factory, tol) in methods().items():
                res = run_method(phi, x0, factory, tol, seed)
                trace = normalized(np.concatenate([[res.trace[0]["phi"]], res.phis("V")]), phi_init, phi_cont)
                e = table[name]
                e["final"].append(float(trace[-1])), e["best"].append(float(trace.min()))
                e["iterations"].append(res.iterations), e["stop"].append(res.stop_reason)
                e["traces"].append(padded(trace, MAX_ITERS + 1))
        for e in table.values():
            traces = np.stack(e.pop("traces"))
            e["trace_median"] = np.median(traces, 0).tolist()
            e["trace_q25"] = np.quantile(traces, 0.25, 0).tolist()
            e["trace_q75"] = np.quantile(traces, 0.75, 0).tolist()
            e["stop_reasons"] = {s: e["stop"].count(s) for s in sorted(set(e["stop"]))}
            del e["stop"]
        out[kind] = table
    return out


def part_gap_vs_c(seeds: int, d: int, cs=(1, 2, 3, 4)) -> dict:
    """Part 2: optimality gap (phi - phi_opt) / (phi_init - phi_cont) on tiny least-squares problems."""
    out = {}
    names = ["exact PV", "linearized PV", "greedy subspace PV (tau=1)", "random subspace PV (tau=1)",
             "STE", "stochastic rounding", "relax-then-round"]
    all_methods = methods(taus=(1,))
    for c in cs:
        gaps = {n: [] for n in names}
        for seed in tqdm(range(seeds), desc=f"gap vs c={c}", leave=False):
            phi = random_problem("least_squares", d, cond=100, seed=1000 + seed)
            opt = global_optimum(phi, c).phi
            xc = continuous_optimum(phi)
            x0 = init_scalar(xc, c)
            scale = max(float(phi.value(x0.decode())) - float(phi.value(xc)), 1e-300)
            for n in names:
                if n == "relax-then-round":
                    value = relax_then_round(phi, c).phi_refined
                else:
                    factory, tol = all_methods[n]
                    value = run_method(phi, x0, factory, tol, seed).phi
                gaps[n].append(max(0.0, (value - opt) / scale))
        out[str(c)] = {n: {"median": float(np.median(g)), "mean": float(np.mean(g)),
                           "optimal_fraction": float(np.mean(np.array(g) <= 1e-9)), "gaps": g}
                       for n, g in gaps.items()}
    return out


def part_tau(seeds: int, d: int, c: int, cond: float, taus=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Part 3: final normalized phi and iterations against tau, random and greedy."""
    out = {"taus": list(taus)}
    for select in ("greedy", "random"):
        rows = []
        for tau in tqdm(taus, desc=f"tau ({select})", leave=False):
            finals, iters = [], []
            for seed in range(seeds):
                phi = random_problem("least_squares", d, cond=cond, seed=seed)
                xc = continuous_optimum(phi)
                x0 = init_scalar(xc, c)
                tol = None if select == "greedy" else 1e-12
                res = run_method(phi, x0, lambda s: subspace_p_step(tau, select, seed=s), tol, seed)
                finals.append(float(normalized(res.phi, float(phi.value(x0.decode())), float(phi.value(xc)))))
                iters.append(res.iterations)
            rows.append({"tau": tau, "final_median": float(np.median(finals)), "final_q25": float(np.quantile(finals, .25)),
                         "final_q75": float(np.quantile(finals, .75)), "iterations_median": float(np.median(iters))})
        out[select] = rows
    return out


def plot(results: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    conv = results["convergence"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, kind in zip(axes, ("least_squares", "quadratic")):
        for name, e in conv[kind].items():
            if "(tau=16)" in name or "(tau=4)" in name and ("random" in name or "memory" in name):
                continue
            med = np.array(e["trace_median"])
            style = "--" if name in ("STE", "stochastic rounding", "relax-then-round") else "-"
            ax.plot(np.arange(len(med)), med, style, label=name, lw=1.5)
            ax.fill_between(np.arange(len(med)), e["trace_q25"], e["trace_q75"], alpha=0.12)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("iteration (P step + V step)")
        ax.set_ylabel("normalized phi (1 = k-means rounding, 0 = unquantized optimum)")
        ax.set_title(f"{kind.replace('_', ' ')}, d=64, c=4: median and IQR over seeds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    paths.append(out / "toy_phi_vs_iterations.png")
    save_figure(fig, paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    gap = results["gap_vs_c"]
    cs = sorted(gap, key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in gap[cs[0]]:
        ax.plot([int(c) for c in cs], [gap[c][name]["mean"] for c in cs], "o-", label=name)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("c (number of distinct values)")
    ax.set_ylabel("mean gap to the global optimum (normalized)")
    ax.set_title("tiny least squares (d=10): gap to the enumerated optimum")
    ax.set_xticks([int(c) for c in cs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(out / "toy_gap_vs_c.png")
    save_figure(fig, paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    tau = results["tau"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for select in ("greedy", "random"):
        rows = tau[select]
        axes[0].errorbar([r["tau"] for r in rows], [r["final_median"] for r in rows],
                         yerr=[[r["final_median"] - r["final_q25"] for r in rows], [r["final_q75"] - r["final_median"] for r in rows]],
                         marker="o", capsize=3, label=select)
        axes[1].plot([r["tau"] for r in rows], [r["iterations_median"] for r in rows], "o-", label=select)
    axes[0].set_ylabel("final normalized phi (median, IQR)")
    axes[1].set_ylabel("iterations to stop (median)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tau (coordinates per P step; 64 = the full linearized step)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("effect of the subspace size tau (least squares, d=64, c=4)")
    paths.append(out / "toy_tau_effect.png")
    save_figure(fig, paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def print_table(results: dict) -> None:
    conv = results["convergence"]
    names = list(conv["least_squares"])
    print(f"\n{'method':34s} | {'least squares':>22s} | {'quadratic':>22s}")
    print(f"{'':34s} | {'final':>7s} {'best':>6s} {'iters':>7s} | {'final':>7s} {'best':>6s} {'iters':>7s}")
    print("-" * 86)
    for n in names:
        cells = []
        for kind in ("least_squares", "quadratic"):
            e = conv[kind][n]
            cells.append(f"{np.median(e['final']):7.3f} {np.median(e['best']):6.3f} {np.median(e['iterations']):7.0f}")
        print(f"{n:34s} | {cells[0]} | {cells[1]}")
    print("(median over seeds of normalized phi: 1 = k-means rounding of the continuous optimum, 0 = the continuous optimum)")
    gap = results["gap_vs_c"]
    cs = sorted(gap, key=int)
    print(f"\n{'gap to global optimum (d=10)':34s} | " + " | ".join(f"c={c} mean / optimal" for c in cs))
    for n in gap[cs[0]]:
        print(f"{n:34s} | " + " | ".join(f"{gap[c][n]['mean']:8.4f} / {gap[c][n]['optimal_fraction']:4.0%}" for c in cs))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the published study: 20 seeds into experiments/results/toy")
    ap.add_argument("--seeds", type=int, default=None, help="random problems per setting (default 5; --full: 20)")
    ap.add_argument("--d", type=int, default=64, help="dimension for parts 1 and 3 (default 64)")
    ap.add_argument("--c", type=int, default=4, help="number of values for parts 1 and 3 (default 4)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for the JSON and plots (default {QUICK}; --full: {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS})")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (20 if args.full else 5)
    args.out = args.out or (RESULTS if args.full else QUICK)
    if args.seeds < 1 or args.d < 2 or args.c < 1:
        ap.error("--seeds and --c must be >= 1 and --d >= 2")
    t0 = time.time()
    results = {
        "command": "python -m experiments.toy_study " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "settings": {"seeds": args.seeds, "d": args.d, "c": args.c, "cond": 100.0, "max_iters": MAX_ITERS,
                     "init": "exact 1-D k-means of the continuous optimum", "v_step": "exact"},
        "convergence": part_convergence(args.seeds, args.d, args.c, 100.0),
        "gap_vs_c": part_gap_vs_c(args.seeds, 10),
        "tau": part_tau(args.seeds, args.d, args.c, 100.0, taus=tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= args.d)),
    }
    results["seconds"] = round(time.time() - t0, 1)
    write_json(args.out / "toy_study.json", results)
    paths = plot(results, args.out)
    print_table(results)
    print(f"\nwrote {args.out / 'toy_study.json'} and {', '.join(p.name for p in paths)} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
