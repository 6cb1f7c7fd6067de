"""What a CUDA kernel call's time is made of: a fit of the measured one-token times to
t = F + w x (super-slabs of 32 input groups that each block walks), per format.

    python -m experiments.kernel_time_model --out experiments/results/kernels/time_model_one_token.json

Every call of the split-K kernel is one wave (llm.cuda_kernel.split_plan), so a call costs a part that does
not depend on its work, F (launch, codebook fill, the activations' load, the partial sums' epilogue), plus
the chain of slabs one block walks. Fitted by least squares on the measured calls (programmatic dependent
launch, the default): the 7B-shaped layers (kernels/gpu_programmatic_dependent_launch.json) and the shared
launches of q, k, v and of gate, up (kernels/gpu_matvec_one_launch_shared_input.json), with the split each
had on the 132 SMs of the H200 they ran on.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from llm.cuda_kernel import blocks_per_sm_for, split_plan
from llm.formats import QuantFormat
from pvtheory.io import write_json

RESULTS = Path(__file__).parent / "results" / "kernels"
H200_SMS = 132


def calls() -> list:
    """(format, name, out rows, input groups, microseconds) of every measured one-token call."""
    single = json.loads((RESULTS / "gpu_programmatic_dependent_launch.json").read_text())["matvec"]
    shared = json.loads((RESULTS / "gpu_matvec_one_launch_shared_input.json").read_text())["cases"]
    return ([(c["format"], f"{c['in']}->{c['out']}", c["out"], c["in"] // 8, statistics.mean(c["cuda_us_with"]))
             for c in single if c["tokens"] == 1] +
            [(c["format"], c["layers"], sum(c["out"]), c["in"] // 8, c["one_launch_us"]) for c in shared if c["tokens"] == 1])


def fit(fmt: str, rows: list) -> dict:
    f = QuantFormat.parse(fmt)
    slots = blocks_per_sm_for(f.num_codebooks, 1 << f.bits) * H200_SMS
    pts = [(name, split_plan(n_out, groups, 1, slots), us) for f, name, n_out, groups, us in rows if f == fmt]
    A = np.array([[1.0, chunk] for _, (_, chunk), _ in pts])
    y = np.array([us for _, _, us in pts])
    (F, w), *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"fixed_us": round(float(F), 2), "us_per_slab": round(float(w), 2), "slots": slots,
            "calls": [{"layers": name, "splits": s, "slabs_per_block": chunk, "measured_us": round(us, 2),
                       "fitted_us": round(float(F + w * chunk), 2), "fixed_share": round(float(F / us), 2)}
                      for name, (s, chunk), us in pts]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = calls()
    result = {"model": "t = fixed_us + us_per_slab x slabs_per_block, one token, one wave per call", "device": "NVIDIA H200",
              "formats": {fmt: fit(fmt, rows) for fmt in ("2x8g8", "1x8g8")}}
    write_json(a.out, result)
    for fmt, r in result["formats"].items():
        print(f"{fmt}: {r['fixed_us']} us per call + {r['us_per_slab']} us per slab a block walks; "
              + ", ".join(f"{c['layers']} {c['measured_us']} ({c['fitted_us']})" for c in r["calls"]))


if __name__ == "__main__":
    main()
