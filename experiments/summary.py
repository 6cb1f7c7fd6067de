"""experiments/results/summary.json: every headline figure of the README, read from the file it comes from.

    python -m experiments.summary           # rewrite summary.json from the result files
    python -m experiments.summary --check   # exit 1 if summary.json and the files disagree

Each entry: the figure's name, its value, the result file (relative to experiments/results) and how
the value is read from it. The tests run --check, so the README's numbers cannot drift from the data.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

from pvtheory.io import write_json

RESULTS = Path(__file__).parent / "results"


def _load(file: str) -> dict:
    return json.loads((RESULTS / file).read_text())


def ppl(file: str, what: str) -> Callable[[], float]:
    """'original', 'calibrated' or a strategy's perplexity in a pipeline summary."""
    def read() -> float:
        s = _load(file)
        return s[f"ppl_{what}"] if what in ("original", "calibrated") else s["runs"][what]["ppl"]
    return read


def key(file: str, *path) -> Callable[[], float]:
    def read():
        v = _load(file)
        for p in path:
            v = v[p]
        return v
    return read


def case_value(file: str, value: str, **match) -> Callable[[], float]:
    """`value` of the first entry of the file's "cases" whose fields equal `match`."""
    return lambda: next(c[value] for c in _load(file)["cases"] if all(c[k] == v for k, v in match.items()))


def toy_median(problem: str, method: str) -> Callable[[], float]:
    return lambda: statistics.median(_load("toy/toy_study.json")["convergence"][problem][method]["final"])


def decode_tokens_per_s(model: str, fmt: str, batch: int = 1, file: str = "kernels/gpu_decode.json",
                        mode: str = "graph") -> Callable[[], float]:
    """Greedy decoding tokens/s of one run in a bench_decode file; mode "graph" or "compiled"."""
    def read():
        runs = _load(file)["runs"]
        return next(r[mode]["tokens_per_s"] for r in runs
                    if r["model"] == model and r["format"] == fmt and r["batch"] == batch)
    return read


def matvec_speedups(fmt: str, tokens: int, over: str, file: str = "kernels/gpu_matvec.json",
                    path: tuple = ("cases",)) -> Callable[[], list]:
    """[min, max] speedup of the CUDA kernel over bf16 ("dense_bf16_us") or AQLM ("aqlm_us") at the 7B shapes,
    over the cases at `path` in `file`."""
    def read():
        cases = key(file, *path)()
        cases = [c for c in cases if c["format"] == fmt and c["tokens"] == tokens]
        ratios = [c[over] / c["cuda_us"] for c in cases]
        return [round(min(ratios), 2), round(max(ratios), 2)]
    return read


HEADLINES = [(f"toy: {method}, {problem} (median normalized phi)", "toy/toy_study.json", toy_median(problem, method))
             for problem in ("least_squares", "quadratic")
             for method in ("exact PV", "greedy subspace PV (tau=1)", "linearized PV", "STE", "stochastic rounding")]
for model in ("ref-llama", "ref-mistral"):
    for fmt in ("1x8g8", "2x8g8"):
        f = f"main_table/{model}_{fmt}.json"
        HEADLINES += [(f"{model} {fmt} {what}", f, ppl(f, what)) for what in ("original", "calibrated", "continuous", "ste", "pv")]
        HEADLINES.append((f"{model} {fmt} bits per quantized weight", f, key(f, "bits", "bits_per_quantized_weight")))
for fmt in ("2x8g8", "1x8g8"):
    f = f"smollm2/pipeline_{fmt}.json"
    HEADLINES += [(f"SmolLM2-135M {fmt} {what}", f, ppl(f, what)) for what in ("original", "calibrated", "continuous", "ste", "pv")]
    HEADLINES += [(f"SmolLM2-135M {fmt} bits per quantized weight", f, key(f, "bits", "bits_per_quantized_weight")),
                  (f"SmolLM2-135M {fmt} whole pipeline seconds", f, key(f, "seconds_total"))]
for fmt, budgets, strategies in (("2x8g8", (80, 280), ("pv", "continuous")), ("1x8g8", (100, 250), ("pv", "ste", "continuous"))):
    f = f"smollm2/budget_{fmt}.json"  # budgets: the steps of its points, in order
    HEADLINES += [(f"SmolLM2-135M {fmt} {s} at {steps} steps, H100", f, key(f, "strategies", s, i, "ppl"))
                  for s in strategies for i, steps in enumerate(budgets)]
HEADLINES += [
    ("SmolLM2-135M 1x8g8 PV at the 2-bit P step", "smollm2/pv_1x8g8_p_lr0.01.json", key("smollm2/pv_1x8g8_p_lr0.01.json", "ppl")),
    ("ref-llama 1x8g8 PV fine-tuning seconds", "main_table/ref-llama_1x8g8.json", key("main_table/ref-llama_1x8g8.json", "runs", "pv", "seconds")),
    ("ref-llama 2x8g8 PV fine-tuning seconds", "main_table/ref-llama_2x8g8.json", key("main_table/ref-llama_2x8g8.json", "runs", "pv", "seconds")),
    *[(f"kernels: CUDA kernel {fmt}, {t} token(s), speedup over {name} at the 7B shapes [min, max]",
       "kernels/gpu_matvec.json", matvec_speedups(fmt, t, over))
      for fmt in ("2x8g8", "1x8g8", "1x16g8") for t in (1, 16) for name, over in (("bf16", "dense_bf16_us"), ("AQLM", "aqlm_us"))],
    *[(f"decoding tokens/s, 7B shape, batch {b}, {fmt}", "kernels/gpu_decode.json", decode_tokens_per_s("llama2-7b-shape", fmt, b))
      for b in (1, 8) for fmt in ("none", "2x8g8", "1x8g8", "1x16g8")],
    *[(f"decoding tokens/s, 7B shape, batch 1, {fmt}, CUDA graph + torch.compile", "kernels/gpu_decode_compiled.json",
       decode_tokens_per_s("llama2-7b-shape", fmt, 1, "kernels/gpu_decode_compiled.json", "compiled"))
      for fmt in ("none", "2x8g8", "1x8g8")],
    ("7B-shape PV-Tuning step seconds (32 blocks, extrapolated)", "scale/finetune_step_7b.json", key("scale/finetune_step_7b.json", "finetune_step", "extrapolated_32_blocks", "seconds_per_step")),
    ("7B-shape PV-Tuning step peak GiB (32 blocks, extrapolated)", "scale/finetune_step_7b.json", key("scale/finetune_step_7b.json", "finetune_step", "extrapolated_32_blocks", "peak_gib")),
    ("ref-llama fine-tuning tokens/s, 1 GPU", "multi_gpu/ref-llama_2x8g8_world1.json", key("multi_gpu/ref-llama_2x8g8_world1.json", "tokens_per_second")),
    ("ref-llama fine-tuning tokens/s, 2 GPUs", "multi_gpu/ref-llama_2x8g8_world2.json", key("multi_gpu/ref-llama_2x8g8_world2.json", "tokens_per_second")),
    ("7B-shape sharded fine-tuning peak GiB, 1 GPU", "multi_gpu/sharded/llama2-7b-shape_world1.json",
     key("multi_gpu/sharded/llama2-7b-shape_world1.json", "peak_gib_per_rank", 0)),
]


def seventy_b_gib(what: str) -> Callable[[], float]:
    """The 70B shape's peak GiB on one GPU, fitted as fixed + per block x blocks to its 8- and 16-block cuts;
    what: 'per_block' or 'all_80_blocks' (extrapolated)."""
    def read() -> float:
        p8, p16 = (_load(f"multi_gpu/sharded/llama2-70b-shape_{n}blocks_world1.json")["peak_gib_per_rank"][0] for n in (8, 16))
        per_block = (p16 - p8) / 8
        return round(per_block if what == "per_block" else p8 + (80 - 8) * per_block, 1)
    return read


HEADLINES += [(f"70B-shape sharded fine-tuning peak GiB on 1 GPU, {what.replace('_', ' ')} (fit of 8 and 16 blocks)",
               "multi_gpu/sharded/llama2-70b-shape_16blocks_world1.json", seventy_b_gib(what))
              for what in ("per_block", "all_80_blocks")]
for fmt in ("2x8g8", "1x8g8"):  # the main table rerun with fine-tuning's P steps as pvtheory Steps
    f = f"main_table/rerun_ref-llama_{fmt}.json"
    HEADLINES += [(f"ref-llama {fmt} rerun {what}", f, ppl(f, what)) for what in ("calibrated", "pv", "ste")]
    g = "main_table/finetune_step_seconds_ref-llama.json"
    HEADLINES += [(f"ref-llama {fmt} {s} median seconds per step, {v}", g, key(g, fmt, v, "strategies", s, "median_step_seconds"))
                  for s in ("pv", "ste") for v in ("before", "after")]
for width, rep, fmt in (("about 2 bits", "scalar", "int2g128"), ("about 2 bits", "vector", "vq8g4"),
                        ("about 1.5 bits", "scalar", "int1g64")):  # representations: means over calibrations
    f = "representations/table_ref-llama.json"
    HEADLINES += [(f"ref-llama {fmt} {what} (mean)", f, key(f, width, rep, "rows", what, "mean"))
                  for what in ("calibrated", "continuous", "ste", "stochastic", "linearized_pv", "pv")]
    HEADLINES.append((f"ref-llama {fmt} PV-Tuning vs the best other, same calibration (percent)", f,
                      key(f, width, rep, "pv_vs_best_other", "percent")))
REPRESENTATION_COLUMNS = [(w, r) for w in ("about 2 bits", "about 1.5 bits") for r in ("scalar", "vector", "additive")]
for width, rep in REPRESENTATION_COLUMNS:
    f = "representations/table_ref-mistral.json"
    HEADLINES.append((f"ref-mistral {width}, {rep}: PV-Tuning vs the best other, same calibration (percent)", f,
                      key(f, width, rep, "pv_vs_best_other", "percent")))
for width, rep in REPRESENTATION_COLUMNS:
    f = "representations/table_smollm2.json"
    HEADLINES.append((f"SmolLM2-135M {width}, {rep}: PV-Tuning vs the best other run, same calibration (percent)", f,
                      key(f, width, rep, "pv_vs_best_other", "percent")))
for width, rep in (("about 2 bits", "scalar"), ("about 2 bits", "vector"), ("about 1.5 bits", "vector")):
    f = "representations/table_smollm2.json"  # three calibrations: each strategy against continuous-only on each
    HEADLINES += [(f"SmolLM2-135M {width}, {rep}: {s} vs continuous-only, same calibration (percent)", f,
                   key(f, width, rep, "vs_continuous", s)) for s in ("pv", "ste")]
for model, f, cols in (("ref-llama", "representations/table_ref-llama.json",
                         (("about 2 bits", "additive"), ("about 1.5 bits", "vector"), ("about 1.5 bits", "additive"))),
                        ("SmolLM2-135M", "representations/table_smollm2.json",
                         (("about 2 bits", "vector"), ("about 2 bits", "additive"), ("about 1.5 bits", "vector"),
                          ("about 1.5 bits", "additive")))):  # the default on codebooks
    HEADLINES += [(f"{model} {width}, {rep}: PV-Tuning with a 5-step P warm-up vs the best other, same calibration "
                   "(percent)", f, key(f, width, rep, "pv_warmup_vs_best_other", "percent")) for width, rep in cols]
HEADLINES.append(("kernels: 2x8g8 CUDA kernel at 2 blocks per SM (the default), 1 token, speedup over bf16 [min, max]",
                  "kernels/gpu_matvec_register_budget.json",
                  matvec_speedups("2x8g8", 1, "dense_bf16_us", "kernels/gpu_matvec_register_budget.json", ("blocks_per_sm", "2"))))


def pdl_speedups(fmt: str, tokens: int) -> Callable[[], list]:
    """[min, max] speedup over bf16 of the CUDA kernel launched as a programmatic dependent, at the 7B shapes."""
    def read():
        cases = _load("kernels/gpu_programmatic_dependent_launch.json")["matvec"]
        ratios = [c["with_vs_bf16"] for c in cases if c["format"] == fmt and c["tokens"] == tokens]
        return [min(ratios), max(ratios)]
    return read


HEADLINES += [(f"kernels: CUDA kernel {fmt}, {t} token(s), programmatic dependent launch (the default on Hopper), "
               "speedup over bf16 at the 7B shapes [min, max]", "kernels/gpu_programmatic_dependent_launch.json",
               pdl_speedups(fmt, t)) for fmt in ("2x8g8", "1x8g8") for t in (1, 16)]


HEADLINES += [(f"kernels: one launch for {layers} at the 7B shapes, {fmt}, 1 token, speedup over one launch per layer",
               "kernels/gpu_matvec_one_launch_shared_input.json",
               case_value("kernels/gpu_matvec_one_launch_shared_input.json", "one_launch_speedup", format=fmt,
                          layers=layers, tokens=1))
              for fmt in ("2x8g8", "1x8g8") for layers in ("q,k,v", "gate,up")]
HEADLINES += [(f"decoding tokens/s, {model}, batch {batch}, CUDA graph + torch.compile, "
               + (f"{fmt} with the layers that read one input fused (llm.fuse)" if fmt != "none" else "bf16, in the same run"),
               f"kernels/{file}",
               decode_tokens_per_s(model, fmt, batch, f"kernels/{file}", "fused_compiled" if fmt != "none" else "compiled"))
              for batch, file in ((1, "gpu_decode_fused.json"), (8, "gpu_decode_fused_batch8.json"))
              for model in ("llama2-7b-shape", "smollm2-135m-shape") for fmt in ("none", "2x8g8", "1x8g8")]
HEADLINES += [(f"kernels: CUDA kernel {fmt}, one token, fitted {what} (microseconds)", "kernels/time_model_one_token.json",
               key("kernels/time_model_one_token.json", "formats", fmt, what))
              for fmt in ("2x8g8", "1x8g8") for what in ("fixed_us", "us_per_slab")]


def build() -> list:
    """[{figure, value, file}] read from the result files now."""
    return [{"figure": name, "value": read(), "file": file} for name, file, read in HEADLINES]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare summary.json with the files; write nothing")
    a = ap.parse_args(argv)
    fresh = build()
    if a.check:
        stored = json.loads((RESULTS / "summary.json").read_text())["figures"]
        if stored != fresh:
            bad = [f["figure"] for f, s in zip(fresh, stored) if f != s] or ["the list of figures"]
            print(f"summary.json disagrees with the result files: {bad[0]}", file=sys.stderr)
            return 1
        print(f"summary.json agrees with the result files ({len(fresh)} figures)")
        return 0
    write_json(RESULTS / "summary.json", {"about": "every headline figure of the README and the file it comes from "
                                                   "(python -m experiments.summary rewrites this)", "figures": fresh})
    print(f"wrote {RESULTS / 'summary.json'} ({len(fresh)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
