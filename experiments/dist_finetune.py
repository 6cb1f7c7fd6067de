"""PV-Tuning on one or several processes (GPUs) at the same global batch: loss curve, time, memory.

    torchrun --nproc-per-node 2 -m experiments.dist_finetune --out r2.json \
        --checkpoint CKPT --model MODEL_DIR --train train.txt.xz --steps 100 --batch-size 32
    torchrun --nproc-per-node 2 -m experiments.dist_finetune --out s2.json --random 7b --steps 3 --batch-size 2
    torchrun --nproc-per-node 8 -m experiments.dist_finetune --out s8.json --random 70b --steps 3 --batch-size 8

The first form fine-tunes a calibrated checkpoint of a reference model; the others a Llama-2-7B- or
70B-shaped model with random weights and random 2x8g8 codes (built on the GPU, no download; the 70B
shape on the meta device, each process materializing only its shards of the teacher), one sequence of
4096 tokens per GPU, gradient checkpointing and bf16 P-step moments. Rank 0 writes the loss of every
step, the seconds of every step, tokens/s, and every rank's peak GPU memory. Run the same command
with --nproc-per-node 1 and 2 and compare with `--compare a.json b.json` (no torchrun).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm import distributed as D
from llm.finetune import FinetuneConfig, finetune
from llm.strategies import settings_for, with_settings
from pvtheory.io import write_json


LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000, num_hidden_layers=80)


def sharded_random_models(shape: dict, device: torch.device, layers: int, fmt: str = "2x8g8"):
    """(teacher bf16, quantized student) too large for one device: both are built on the meta device;
    the teacher's layers are sharded over the processes (FSDP2) before any memory is given to them,
    so each process materializes only its shards (random values: the cost of a step does not depend
    on them); the student gets its random codes and codebooks straight on `device` (2 bits a weight)."""
    from transformers import LlamaForCausalLM

    from experiments.bench_scale import quantize_randomly
    from llm.formats import QuantFormat
    from llm.model import tiny_config

    config = tiny_config("llama", hidden=shape["hidden_size"], layers=layers, heads=shape["num_attention_heads"],
                         kv_heads=shape.get("num_key_value_heads"), intermediate=shape["intermediate_size"],
                         vocab=shape["vocab_size"])
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        teacher, student = LlamaForCausalLM(config).to(torch.bfloat16), LlamaForCausalLM(config)
    D.shard_for_inference(teacher, device)
    teacher.to_empty(device=device)
    quantize_randomly(student, QuantFormat.parse(fmt), device)  # codes and codebooks straight on the device
    for m in student.modules():  # what is still on the meta device (embeddings, norms, head), not the codes
        if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
            m.to_empty(device=device, recurse=False)
    for model in (teacher, student):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "codebooks" in n or "scales" in n:  # the student's, set above
                    continue
                local = p.to_local() if hasattr(p, "to_local") else p
                local.fill_(1.0) if "norm" in n else local.normal_(0, 0.02, generator=gen)
        with torch.device(device):  # the rotary embedding's buffers were on the meta device too: a fresh one
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return teacher.eval(), student


def random_models(shape: dict, device: torch.device, layers: int, fmt: str = "2x8g8"):
    """(teacher bf16, quantized student) of the given shape with random weights and codes, built on
    `device` with seeded generators, so that every rank builds the same models."""
    from experiments.bench_scale import quantize_randomly, random_model
    from llm.formats import QuantFormat

    teacher = random_model(shape, layers, torch.bfloat16, device)
    student = random_model(shape, layers, torch.bfloat16, device)  # same seed: same weights
    quantize_randomly(student, QuantFormat.parse(fmt))
    for name, p in student.named_parameters():  # the parameters left unquantized train in fp32
        if not any(k in name for k in ("codebooks", "scales")):
            p.data = p.data.float()
    return teacher, student


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", help="the checkpoint's base model directory")
    ap.add_argument("--train")
    ap.add_argument("--random", choices=("70b", "7b", "small"),
                    help="a random Llama-2-7B- or 70B-shaped model (small: CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the random model (default: the shape's)")
    ap.add_argument("--meta", action="store_true",
                    help="build the random models on the meta device, teacher sharded before it takes memory "
                         "(always for 70b: no process could hold it whole)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (sequences per step, all GPUs)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="default: 512, or 4096 with --random 7b")
    ap.add_argument("--nsamples", type=int, default=1024)
    ap.add_argument("--compare", nargs=2, metavar="JSON", help="compare two results files and exit")
    a = ap.parse_args(argv)
    if a.compare:
        print(json.dumps(compare(*a.compare), indent=1))
        return
    device = D.init_from_env()
    seq_len = a.seq_len or (4096 if a.random else 512)
    cfg_kw = dict(strategy="pv", steps=a.steps, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
                  checkpoint_every=10**9, settings=settings_for("pv", None, {"p_warmup": 0}))  # codes move from step 1
    if a.random:
        from experiments.bench_scale import LLAMA2_7B, SMALL

        shape = {"70b": LLAMA2_70B, "7b": LLAMA2_7B, "small": SMALL}[a.random]
        layers = a.layers or shape["num_hidden_layers"]
        build = sharded_random_models if (a.meta or a.random == "70b") else random_models
        teacher, student = build(shape, device, layers)
        vocab = teacher.config.vocab_size
        seqs = torch.randint(0, vocab, (max(a.batch_size, 8), seq_len), generator=torch.Generator().manual_seed(0))
        cfg_kw.update(grad_checkpointing=True, settings=with_settings(cfg_kw["settings"], p_state_dtype="bfloat16"))
        source = f"random Llama-2 shape ({a.random}), {layers} blocks, 2x8g8"
    else:
        from llm.checkpoint import load_checkpoint
        from llm.model import load_model
        from llm.pipeline import train_sequences

        student, meta, _ = load_checkpoint(a.checkpoint, a.model, device)
        teacher = load_model(a.model, torch.float32, device)
        seqs = train_sequences(a.model, a.train, seq_len, a.nsamples)
        source = f"{a.checkpoint} ({a.model})"
    cfg = FinetuneConfig(**cfg_kw)
    times = []

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time())

    D.shard_for_inference(teacher, device)  # as finetune would: the peak below counts only this process's shards
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rep = finetune(student, teacher, seqs, cfg, device=device, progress=D.rank() == 0, on_step=on_step)
    step_seconds = [round(b - a_, 4) for a_, b in zip([t0] + times[:-1], times)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # per rank: peak memory, and how many continuous parameters' optimizer state it keeps (sharded, ZeRO-1)
    per_rank = [(peak, rep["v_parameters_held"])] * D.world_size()
    if D.is_distributed():
        torch.distributed.all_gather_object(per_rank, per_rank[0])
    peaks, held = [p for p, _ in per_rank], [h for _, h in per_rank]
    if D.rank() == 0:
        steady = step_seconds[1:] or step_seconds
        res = {"source": source, "world_size": D.world_size(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "seq_len": seq_len, "global_batch": a.batch_size,
               "micro_batch_size": a.micro_batch_size, "config": rep["config"], "losses": rep["losses"],
               "codes_changed": rep["codes_changed"], "step_seconds": step_seconds,
               "seconds_per_step_after_first": round(sum(steady) / len(steady), 4),
               "tokens_per_second": round(a.batch_size * seq_len * len(steady) / sum(steady), 1),
               "peak_gib_per_rank": [None if p is None else round(p, 2) for p in peaks],
               "v_parameters_held_per_rank": held}
        write_json(a.out, res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("losses", "codes_changed", "step_seconds", "config")}))
    del teacher, student
    D.leave()


def compare(path_a: str, path_b: str) -> dict:
    """Largest relative difference of the two loss curves, and throughput/memory side by side."""
    ra, rb = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    la, lb = ra["losses"], rb["losses"]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)]
    return {"world_sizes": [ra["world_size"], rb["world_size"]], "steps_compared": len(rel),
            "max_relative_loss_difference": max(rel), "mean_relative_loss_difference": sum(rel) / len(rel),
            "final_losses": [la[-1], lb[-1]], "codes_changed_total": [sum(ra["codes_changed"]), sum(rb["codes_changed"])],
            "tokens_per_second": [ra["tokens_per_second"], rb["tokens_per_second"]],
            "peak_gib_per_rank": [ra["peak_gib_per_rank"], rb["peak_gib_per_rank"]]}


if __name__ == "__main__":
    main()
