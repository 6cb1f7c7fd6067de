"""The paper's convergence statements as measured curves beside their bounds (pvtheory.bounds), on random
least-squares and quadratic problems over R^d_c (scalar codes: c values, one code per coordinate).

    python -m experiments.theory_bounds --out experiments/results/theory

Statements (docs/method.md, "Convergence statements, measured"):
  exact_pv             Algorithm 1 with the exact P and V steps: phi never increases, stays >= phi*_c, and
                       stops at a PV-stationary point (d = 10, where the exact P step enumerates 4^10 codes)
  linearized_pv        linearized P step (step 1/L) + linearized V step (step 1/L_V): each half-step falls
                       by at least its descent-lemma guarantee; min_k delta_k <= (phi(x^0) - phi*_c) / K
  v_step_rate          the linearized V step repeated with the codes fixed: phi_V - phi_V* <= (1 - mu_V/L_V)^k
  random_subspace_pv   linearized subspace P step, S of s coordinates drawn at random, step 1/L_s (L_s the
                       largest L_S over |S| = s), exact V step: the bound holds for every draw; mean over draws
  greedy_subspace_pv   the greedy variant (step 1/L_S of the chosen S): no rate in the theory; its curve
  ste                  straight-through estimation with exact V steps on the same problems, and on the
                       one-coordinate counterexample (x - 0.6)^2 over {0, 1}: not monotone

Each run starts from a perturbed rounding of the continuous optimum (x_cont + std(x_cont) * N(0, 1), rounded
to c evenly spaced values), so the steps have codes to change. phi*_c is exact (enumeration) at d = 10 and
the continuous minimum, a lower bound, at d = 64. Curves are normalized: (phi - phi*) / (phi(x^0) - phi*).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pvtheory import (LeastSquares, continuous_optimum, exact_p_step, exact_v_step, gradient_v_step, init_scalar,
                      linearized_p_step, no_v_step, random_problem, scalar, ste_p_step, subspace_p_step)
from pvtheory.bounds import (certified_run, feasible_minimum, linearized_v_step, support_smoothness,
                             uniform_subspace_smoothness, value_curvature)
from pvtheory.io import write_json
from pvtheory.steps import point
from pvtheory.v_steps import solve_values_exactly


def start_point(objective, c: int, seed: int):
    """A perturbed rounding of the continuous optimum onto c evenly spaced values."""
    xc = continuous_optimum(objective)
    gen = torch.Generator().manual_seed(1000 + seed)
    return init_scalar(xc + xc.std() * torch.randn(objective.d, generator=gen, dtype=torch.float64), c, "grid")


def normalized(values, phi0: float, phi_star: float) -> list:
    return [(v - phi_star) / max(phi0 - phi_star, 1e-300) for v in values]


def curve(run: dict, phi_star: float) -> list:
    """phi(x^k) for k = 0..K (before each iteration, and the final one), normalized."""
    phis = [r["phi"] for r in run["rows"]] + [run["final_phi"]]
    return normalized(phis, phis[0], phi_star)


def quantiles(curves: list) -> dict:
    a = np.array(curves)
    return {"median": np.median(a, 0).tolist(), "q10": np.quantile(a, 0.1, 0).tolist(),
            "q90": np.quantile(a, 0.9, 0).tolist(), "mean": a.mean(0).tolist()}


def certificate_check(run: dict, key_bound: str, key_phi: str) -> float:
    """The largest amount by which a measured phi exceeded its bound (<= rounding error when it holds)."""
    return max(r[key_phi] - r[key_bound] for r in run["rows"])


def certified_curve(run: dict, phi_star: float, keys=("guaranteed_decrease",)) -> list:
    """B_k = phi(x^0) - the guaranteed decreases of the first k iterations, normalized: an upper bound on phi(x^k)
    when every half-step falls at least by its guarantee (the V steps' guarantee counted where it is given, else 0:
    an exact V step never increases phi)."""
    phi0 = run["rows"][0]["phi"]
    b, out = phi0, [phi0]
    for r in run["rows"]:
        b -= sum(r.get(k, 0.0) for k in keys)
        out.append(b)
    return normalized(out, phi0, phi_star)


def rate_check(run: dict, phi_star: float, keys=("guaranteed_decrease",)) -> dict:
    """min over the first k iterations of the guaranteed decrease (P and V summed) against (phi0 - phi*) / k."""
    deltas = [sum(r.get(k, 0.0) for k in keys) for r in run["rows"]]
    phi0 = run["rows"][0]["phi"]
    mins = np.minimum.accumulate(deltas).tolist()
    bound = [(phi0 - phi_star) / (k + 1) for k in range(len(deltas))]
    return {"min_delta": mins, "bound": bound, "holds": all(m <= b * (1 + 1e-9) + 1e-12 for m, b in zip(mins, bound))}


def rate_curve(rc: dict, run: dict, phi_star: float) -> list:
    """min over the first k iterations of the guaranteed decrease, over phi(x^0) - phi*: the O(1/K) statement's
    measured side (its bound is 1 / k)."""
    gap = max(run["rows"][0]["phi"] - phi_star, 1e-300)
    return [m / gap for m in rc["min_delta"]]


def study(kind: str, d: int, c: int, seeds: int, iters: int, sizes: list, draws: int) -> dict:
    out = {"kind": kind, "d": d, "c": c, "cond": 100, "seeds": seeds, "iterations": iters, "subspace_sizes": sizes,
           "draws_per_problem": draws, "statements": {}}
    st = out["statements"]
    acc: dict = {}

    def add(name: str, key: str, value) -> None:
        acc.setdefault(name, {}).setdefault(key, []).append(value)

    exact_star = []
    for seed in range(seeds):
        phi = random_problem(kind, d, cond=100, seed=seed)
        x0 = start_point(phi, c, seed)
        phi_star, exact = feasible_minimum(phi, c)
        exact_star.append(exact)
        if d <= 10:  # Algorithm 1 with the exact P step (4^d assignments enumerated)
            run = certified_run(phi, x0, exact_p_step("enumerate"), exact_v_step(), 6)
            phis = [r["phi"] for r in run["rows"]] + [run["final_phi"]]
            add("exact_pv", "curves", normalized(phis, phis[0], phi_star))
            add("exact_pv", "monotone", bool(all(b <= a + 1e-12 * max(1, abs(a)) for a, b in zip(phis, phis[1:]))))
            add("exact_pv", "above_phi_star", bool(min(phis) >= phi_star - 1e-9 * max(1, abs(phi_star))))
            add("exact_pv", "iterations_to_fixed_point", next((k for k, r in enumerate(run["rows"]) if r["changed"] == 0
                                                              and abs(r["phi_after_v"] - r["phi"]) <= 1e-12 * max(1, r["phi"])), None))
        # linearized P (1/L) and linearized V (1/L_V) steps
        run = certified_run(phi, x0, linearized_p_step(), linearized_v_step(), iters, L_p=phi.L, v_certificate=True)
        add("linearized_pv", "curves", curve(run, phi_star))
        add("linearized_pv", "p_bound_excess", certificate_check(run, "bound_after_p", "phi_after_p"))
        add("linearized_pv", "v_bound_excess", certificate_check(run, "bound_after_v", "phi_after_v"))
        add("linearized_pv", "codes_changed", sum(r["changed"] for r in run["rows"]))
        rc = rate_check(run, phi_star, ("guaranteed_decrease", "v_guaranteed_decrease"))
        add("linearized_pv", "bound_curves", certified_curve(run, phi_star, ("guaranteed_decrease", "v_guaranteed_decrease")))
        add("linearized_pv", "rate_min_delta", rate_curve(rc, run, phi_star))
        add("linearized_pv", "rate_holds", rc["holds"])
        add("linearized_pv", "rate_min_delta_over_bound_at_K", rc["min_delta"][-1] / max(rc["bound"][-1], 1e-300))
        # the V step's linear rate with the codes of x0 fixed
        L_V, mu_V = value_curvature(x0, phi)
        v_star = float(phi.value(point(solve_values_exactly(x0, phi))))
        param, gaps = x0, []
        step = gradient_v_step(1.0 / L_V)
        for _ in range(iters + 1):
            gaps.append(float(phi.value(point(param))) - v_star)
            param, _ = step.update(param, phi, None)
        rate = 1 - mu_V / L_V
        add("v_step_rate", "measured", [g / max(gaps[0], 1e-300) for g in gaps])
        add("v_step_rate", "bound", [rate ** k for k in range(iters + 1)])
        add("v_step_rate", "holds", bool(all(g <= gaps[0] * rate ** k * (1 + 1e-9) + 1e-12 for k, g in enumerate(gaps))))
        add("v_step_rate", "contraction", rate)
        add("v_step_rate", "measured_rate", float(np.exp(np.mean(np.diff(np.log(np.maximum(gaps[:20], 1e-300)))))))
        for s in sizes:
            L_s, exact_L = uniform_subspace_smoothness(phi, s)
            add(f"random_subspace_pv_s{s}", "L_s_over_L", L_s / phi.L)
            add(f"random_subspace_pv_s{s}", "L_s_exact", exact_L)
            runs = [certified_run(phi, x0, subspace_p_step(s, "random", seed=r, L_S=L_s), exact_v_step(), iters, L_p=L_s)
                    for r in range(draws)]
            add(f"random_subspace_pv_s{s}", "curves", np.mean([curve(r, phi_star) for r in runs], 0).tolist())
            add(f"random_subspace_pv_s{s}", "bound_curves", np.mean([certified_curve(r, phi_star) for r in runs], 0).tolist())
            add(f"random_subspace_pv_s{s}", "rate_min_delta",
                np.mean([rate_curve(rate_check(r, phi_star), r, phi_star) for r in runs], 0).tolist())
            add(f"random_subspace_pv_s{s}", "p_bound_excess", max(certificate_check(r, "bound_after_p", "phi_after_p") for r in runs))
            add(f"random_subspace_pv_s{s}", "rate_holds", all(rate_check(r, phi_star)["holds"] for r in runs))
            add(f"random_subspace_pv_s{s}", "codes_changed", float(np.mean([sum(x["changed"] for x in r["rows"]) for r in runs])))
            wrong = certified_run(phi, x0, subspace_p_step(s, "random", seed=0, L_S=L_s / 2), exact_v_step(), iters,
                                  L_p=L_s / 2)
            add(f"random_subspace_pv_s{s}", "wrong_step_bound_excess", certificate_check(wrong, "bound_after_p", "phi_after_p"))
            greedy = certified_run(phi, x0, subspace_p_step(s, "greedy", score="update"), exact_v_step(), iters,
                                   L_p=lambda x, y: support_smoothness(phi, x, y))
            add(f"greedy_subspace_pv_s{s}", "curves", curve(greedy, phi_star))
            add(f"greedy_subspace_pv_s{s}", "p_bound_excess", certificate_check(greedy, "bound_after_p", "phi_after_p"))
            add(f"greedy_subspace_pv_s{s}", "codes_changed", sum(x["changed"] for x in greedy["rows"]))
        ste = certified_run(phi, x0, ste_p_step(), exact_v_step(), iters, L_p=phi.L)
        phis = [r["phi"] for r in ste["rows"]] + [ste["final_phi"]]
        add("ste", "curves", curve(ste, phi_star))
        add("ste", "increases", int(sum(b > a * (1 + 1e-9) for a, b in zip(phis, phis[1:]))))
        add("ste", "p_bound_excess", certificate_check(ste, "bound_after_p", "phi_after_p"))
        add("ste", "descent_guarantee_negative", int(sum(r["guaranteed_decrease"] < -1e-12 for r in ste["rows"])))
    out["phi_star_exact"] = all(exact_star)
    for name, entries in acc.items():
        summary = {}
        for key, values in entries.items():
            if key in ("curves", "measured", "bound", "bound_curves", "rate_min_delta"):
                summary[key] = quantiles(values)
            elif isinstance(values[0], bool):
                summary[key] = all(values)
            else:
                summary[key] = {"median": float(np.median(values)), "max": float(np.max(values)), "min": float(np.min(values))}
        st[name] = summary
    return out


def ste_counterexample(iters: int) -> dict:
    """phi(x) = (x - 0.6)^2 over the values {0, 1}: STE's phi cycles; the exact PV stops at once."""
    phi = LeastSquares(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64))
    start = scalar(torch.tensor([1]), torch.tensor([0.0, 1.0], dtype=torch.float64))
    ste = certified_run(phi, start, ste_p_step(), no_v_step(), iters, L_p=phi.L)
    pv = certified_run(phi, start, linearized_p_step(), no_v_step(), iters, L_p=phi.L)
    ste_phis = [r["phi"] for r in ste["rows"]] + [ste["final_phi"]]
    pv_phis = [r["phi"] for r in pv["rows"]] + [pv["final_phi"]]
    return {"ste_phi": ste_phis, "linearized_pv_phi": pv_phis, "phi_star": 0.16,
            "ste_increases": int(sum(b > a + 1e-12 for a, b in zip(ste_phis, ste_phis[1:]))),
            "ste_guarantee_negative": int(sum(r["guaranteed_decrease"] < -1e-12 for r in ste["rows"]))}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, res in results["studies"].items():
        st = res["statements"]
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
        ax = axes[0, 0]
        for n in [n for n in st if "curves" in st[n]]:
            q = st[n]["curves"]
            k = np.arange(len(q["median"]))
            ax.plot(k, q["median"], label=n)
            ax.fill_between(k, q["q10"], q["q90"], alpha=0.12)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylabel("(phi - phi*) / (phi(x0) - phi*)")
        ax.set_title(f"{res['kind']}, d={res['d']}, c={res['c']}: measured, median and 10-90%", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        for n, color in (("linearized_pv", "C0"), ("random_subspace_pv_s1", "C1"), ("random_subspace_pv_s4", "C3")):
            k = np.arange(len(st[n]["curves"]["median"]))
            ax.plot(k, st[n]["curves"]["median"], color=color, label=f"{n}: measured")
            ax.plot(k, st[n]["bound_curves"]["median"], "--", color=color, label=f"{n}: bound phi(x0) - sum of guarantees")
        ax.set_ylabel("normalized phi (median)")
        ax.set_title("per-step descent guarantees summed: the bound stays above the curve", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1, 0]
        for n, color in (("linearized_pv", "C0"), ("random_subspace_pv_s1", "C1"), ("random_subspace_pv_s4", "C3")):
            q = st[n]["rate_min_delta"]
            k = np.arange(1, len(q["median"]) + 1)
            ax.plot(k, np.maximum(q["median"], 1e-12), color=color, label=f"{n}: min_k delta_k / (phi0 - phi*)")
        ax.plot(k, 1.0 / k, "k--", label="bound 1 / K")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iterations K")
        ax.set_title("the O(1/K) rate of the smallest guaranteed decrease", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1, 1]
        q, b = st["v_step_rate"]["measured"], st["v_step_rate"]["bound"]
        k = np.arange(len(q["median"]))
        ax.plot(k, q["median"], label="linearized V step, measured (median)")
        ax.fill_between(k, q["q10"], q["q90"], alpha=0.2)
        ax.plot(k, b["median"], "--", label="(1 - mu_V/L_V)^k (median)")
        ax.set_yscale("log")
        ax.set_xlabel("V steps, codes fixed")
        ax.set_ylabel("(phi_V - phi_V*) / (phi_V(v0) - phi_V*)")
        ax.set_title("the V step's linear rate", fontsize=10)
        ax.legend(fontsize=8)
        for a in axes[0]:
            a.set_xlabel("iteration k")
        fig.tight_layout()
        fig.savefig(out / f"curves_{key}.png", dpi=100)
        plt.close(fig)
    ce = results["ste_counterexample"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ce["ste_phi"], "o-", ms=3, label="STE")
    ax.plot(ce["linearized_pv_phi"], label="linearized PV (monotone bound)")
    ax.axhline(ce["phi_star"], ls=":", color="k", label="phi* over {0, 1}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("phi")
    ax.set_title("(x - 0.6)^2 over {0, 1}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ste_counterexample.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for theory_bounds.json and the plots")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--draws", type=int, default=5, help="random subspaces drawn per problem")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 15 iterations, 2 draws (a smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.iters, a.draws = 2, 15, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {"what": "the paper's convergence statements: measured curves beside their bounds (pvtheory.bounds)",
               "studies": {}}
    for kind in ("least_squares", "quadratic"):
        for d in (10, 64):
            key = f"{kind}_d{d}"
            results["studies"][key] = study(kind, d, 4, a.seeds, a.iters, [1, 4], a.draws)
            print(f"{key}: {time.time() - t0:.0f} s", flush=True)
    results["ste_counterexample"] = ste_counterexample(30)
    results["seconds"] = round(time.time() - t0, 1)
    write_json(out / "theory_bounds.json", results)
    plot(results, out)


if __name__ == "__main__":
    main()
