"""Scale benchmark: a Llama-2-7B-shaped model with random weights (built from its config, no download).

    python -m experiments.bench_scale --out experiments/results/scale/finetune_step_7b.json

2. Calibration of one decoder block (AQLM 2x8g8, the library's calibrate() on a one-block model):
   wall time and peak GPU memory, extrapolated to the 32 blocks (time x 32; memory is per block,
   since calibration holds one block at a time on the GPU).
1. One fine-tuning step (PV-Tuning, KL to a bf16 teacher, gradient checkpointing, one sequence of
   4096 tokens) on models of L1 and L2 blocks: time per step and peak memory, extrapolated linearly
   in the number of blocks to 32. Codes and codebooks are random: the cost does not depend on them.
--small shrinks every dimension (a CPU smoke test of the same code path).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.finetune import FinetuneConfig, finetune
from llm.formats import QuantFormat, make_quantized
from llm.model import block_linears, decoder_layers, set_module, tiny_config
from llm.strategies import settings_for
from pvtheory.io import write_json

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000,
                 num_hidden_layers=32)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, num_hidden_layers=30)
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, vocab_size=1000, num_hidden_layers=32)


def random_model(shape: dict, layers: int, dtype: torch.dtype, device) -> torch.nn.Module:
    """A Llama model of the given shape with `layers` blocks and random weights, built on `device`."""
    from transformers import LlamaForCausalLM

    config = tiny_config("llama", hidden=shape["hidden_size"], layers=layers, heads=shape["num_attention_heads"],
                         kv_heads=shape.get("num_key_value_heads"), intermediate=shape["intermediate_size"],
                         vocab=shape["vocab_size"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_calibration(shape: dict, fmt: str, nsamples: int, seq_len: int, cfg_kw: dict, device) -> dict:
    """Calibrate a one-block model; the block is the unit that calibration streams through the GPU."""
    model = random_model(shape, 1, torch.float32, "cpu")
    seqs = torch.randint(0, shape["vocab_size"], (nsamples, seq_len), generator=torch.Generator().manual_seed(0))
    cfg = CalibrationConfig(fmt=fmt, **cfg_kw)
    reset_peak(device)
    t0 = time.time()
    report = calibrate(model, seqs, cfg, device=device, progress=False)
    sync(device)
    seconds = time.time() - t0
    linears = {l["name"].split(".", 3)[-1]: l for l in report["layers"]}  # "self_attn.q_proj": its report
    return {"format": fmt, "nsamples": nsamples, "seq_len": seq_len, "config": report["config"],
            "seconds_one_block": round(seconds, 1), "seconds_per_linear": {k: l["seconds"] for k, l in linears.items()},
            "phase_seconds": report["phase_seconds"],
            # relative_error holds the error after init and after each half-step of every round
            "rounds_run_per_linear": {k: (len(l["relative_error"]) - 1) // 2 for k, l in linears.items()},
            "peak_gib_one_block": peak_gib(device),
            "extrapolated_seconds_32_blocks": round(seconds * shape["num_hidden_layers"], 0),
            "mean_relative_layer_error": sum(l["relative_error"][-1] for l in report["layers"]) / len(report["layers"])}


def quantize_randomly(model: torch.nn.Module, fmt: QuantFormat, device=None) -> None:
    """Replace every block linear by an AQLM layer with random codes and codebooks (fp32 values),
    drawn on `device` (default: the model's; a model on the meta device gets real layers there)
    from a seeded generator (the same model in every process)."""
    device = device or next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    for block in decoder_layers(model):
        for name, linear in block_linears(block).items():
            q = make_quantized(linear, fmt, device)
            with torch.no_grad():
                q.set_codes(torch.randint(0, 1 << fmt.bits, q.codes.shape, generator=gen, device=device))
                q.codebooks.normal_(0, 0.01, generator=gen)
            set_module(block, name, q)


def bench_finetune_step(shape: dict, fmt: str, layers: int, seq_len: int, ft_kw: dict, device) -> dict:
    """Seconds per PV-Tuning step and peak memory for a model with `layers` blocks."""
    teacher = random_model(shape, layers, torch.bfloat16, device)
    student = copy.deepcopy(teacher).float()
    quantize_randomly(student, QuantFormat.parse(fmt))
    seqs = torch.randint(0, shape["vocab_size"], (4, seq_len), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(**ft_kw)
    finetune(student, teacher, seqs, FinetuneConfig(**dict(ft_kw, steps=1)), device=device, progress=False)  # warm-up
    reset_peak(device)
    rep = finetune(student, teacher, seqs, cfg, device=device, progress=False)
    sync(device)
    return {"layers": layers, "seconds_per_step": round(rep["seconds"] / cfg.steps, 3), "peak_gib": peak_gib(device),
            "codes_changed_per_step": rep["codes_changed"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", default="2x8g8")
    ap.add_argument("--small", action="store_true", help="tiny dimensions: a CPU smoke test")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="two model depths for the fine-tuning step")
    ap.add_argument("--block-tune-steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--skip", choices=("calibration", "finetune"), default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMALL if a.small else LLAMA2_7B
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    if a.skip != "finetune":
        settings = settings_for("pv", None, {"p_warmup": 0, "p_state_dtype": "bfloat16"})  # time real P steps
        ft_kw = dict(strategy="pv", steps=3, batch_size=1, grad_checkpointing=True, checkpoint_every=10**9,
                     settings=settings)
        runs = []
        for L in a.layers:
            runs.append(bench_finetune_step(shape, a.format, L, a.seq_len, ft_kw, device))
            print(runs[-1], flush=True)
            reset_peak(device)
        (l1, r1), (l2, r2) = [(r["layers"], r) for r in runs]
        n = shape["num_hidden_layers"]

        def extrapolate(key: str):
            if r1[key] is None:
                return None
            slope = (r2[key] - r1[key]) / (l2 - l1)
            return round(r1[key] + slope * (n - l1), 2)

        res["finetune_step"] = {"config": ft_kw, "seq_len": a.seq_len, "batch_sequences": 1, "runs": runs,
                                "extrapolated_32_blocks": {"seconds_per_step": extrapolate("seconds_per_step"),
                                                           "peak_gib": extrapolate("peak_gib")}}
        print(res["finetune_step"]["extrapolated_32_blocks"], flush=True)
        write_json(a.out, res)
    if a.skip != "calibration":
        cal_kw = dict(batch_size=4, block_tune_steps=a.block_tune_steps, rounds=a.rounds)
        res["calibration"] = bench_calibration(shape, a.format, a.nsamples, a.seq_len, cal_kw, device)
        print(res["calibration"], flush=True)
        write_json(a.out, res)


if __name__ == "__main__":
    main()
