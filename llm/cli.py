"""pvtuning: compress a Hugging Face Llama/Mistral model to 1-2 bits and fine-tune it with PV-Tuning.

    pvtuning pipeline MODEL --train TRAIN --validation VAL --out DIR [--format 2x8g8] [--strategies pv,ste]
    pvtuning calibrate MODEL --train TRAIN --out CKPT [--format 2x8g8]
    pvtuning finetune CKPT --train TRAIN --out CKPT2 [--strategy pv] [--steps 200]
    torchrun --nproc-per-node 2 -m llm.cli finetune ...   (data parallel over 2 GPUs, same result)
    pvtuning eval MODEL_OR_CKPT --validation VAL
    pvtuning generate MODEL_OR_CKPT --prompt TEXT [--new-tokens 64] [--bf16]
    pvtuning export CKPT --out HF_DIR

MODEL: a Hugging Face model directory, a GGUF file (dequantized to float by transformers' GGUF
loader; needs pip install 'pvtuning[gguf]'), or a folder holding one GGUF file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llm.calibrate import CalibrationConfig
from llm.finetune import STRATEGIES, FinetuneConfig

EXPECTED_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def _device(arg):
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def _calib_cfg(a) -> CalibrationConfig:
    from llm.formats import QuantFormat

    QuantFormat.parse(a.format)
    return CalibrationConfig(fmt=a.format, rounds=a.rounds, tolerance=a.tolerance, beam_width=a.beam_width,
                             block_tune_steps=a.block_tune_steps, block_tune_lr=a.block_tune_lr,
                             batch_size=a.batch_size, seed=a.seed, true_sequential=a.true_sequential,
                             original_targets=a.original_targets)


def _ft_cfg(a, strategy: str) -> FinetuneConfig:
    return FinetuneConfig(strategy=strategy, steps=a.steps, batch_size=a.ft_batch_size,
                          micro_batch_size=a.micro_batch_size, lr=a.lr, lr_schedule=a.lr_schedule, v_optimizer=a.v_optimizer,
                          p_lr=a.p_lr, tau=a.tau,
                          p_beta1=a.p_beta1, p_metric=a.p_metric, p_select=a.p_select, trust_ratio=a.trust_ratio, beam_width=a.beam_width,
                          train_other=not a.freeze_other, grad_checkpointing=a.grad_checkpointing,
                          logit_chunk=a.logit_chunk or None, seed=a.seed).validate()


def _strategy_settings(a) -> dict:
    """Per-strategy FinetuneConfig overrides: the tuned ones for the format unless --untuned, then --strategy-settings."""
    from llm.pipeline import tuned_strategy_settings

    settings = {} if a.untuned else tuned_strategy_settings(a.format)
    if a.strategy_settings:
        try:
            extra = json.loads(a.strategy_settings)
        except json.JSONDecodeError as e:
            raise ValueError(f"--strategy-settings is not valid JSON: {e}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError('--strategy-settings must look like {"pv": {"tau": 0.01}}')
        for k, v in extra.items():
            settings.setdefault(k, {}).update(v)
    return settings


def _read_prompts(path) -> list:
    """The non-empty lines of a text file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {p} has no non-empty line")
    return prompts


def cmd_pipeline(a) -> None:
    from llm.pipeline import format_summary, run_pipeline

    from llm.model import read_config

    read_config(a.model)
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    prompts = _read_prompts(a.prompts) if a.prompts else ()
    summary = run_pipeline(a.model, a.train, a.validation, a.out, _calib_cfg(a), _ft_cfg(a, strategies[0]), strategies,
                           a.seq_len, a.nsamples, a.eval_windows, _device(a.device),
                           strategy_settings=_strategy_settings(a), ft_nsamples=a.ft_nsamples,
                           prompts=prompts, new_tokens=a.new_tokens)
    print(format_summary(summary))
    print(f"summary: {Path(a.out) / 'summary.json'}")


def cmd_calibrate(a) -> None:
    from llm.calibrate import calibrate
    from llm.checkpoint import save_checkpoint
    from llm.formats import model_bits
    from llm.model import load_model, read_config
    from llm.pipeline import train_sequences

    read_config(a.model)
    cfg = _calib_cfg(a)
    seqs = train_sequences(a.model, a.train, a.seq_len, a.nsamples)
    model = load_model(a.model, torch.float32, "cpu")
    report = calibrate(model, seqs, cfg, device=_device(a.device))
    save_checkpoint(a.out, model, {"base_model": str(Path(a.model).resolve()), "calibration": report})
    print(f"calibrated {a.model} to {a.format} ({model_bits(model)['bits_per_quantized_weight']:.3f} bits per "
          f"quantized weight) in {report['seconds']} s: {a.out}")


def cmd_finetune(a) -> None:
    from llm import distributed as D
    from llm.checkpoint import load_checkpoint
    from llm.finetune import finetune
    from llm.model import load_model
    from llm.pipeline import finetune_nsamples, train_sequences

    dev = D.init_from_env() if D.launched_by_torchrun() else _device(a.device)
    student, meta, _ = load_checkpoint(a.checkpoint, a.model, dev)
    base = a.model or meta["base_model"]
    cfg = _ft_cfg(a, a.strategy)
    seqs = train_sequences(base, a.train, a.seq_len, finetune_nsamples(cfg, a.nsamples, a.ft_nsamples), a.seed + 1)
    teacher = load_model(base, torch.float32, dev)
    rep = finetune(student, teacher, seqs, cfg, device=dev, checkpoint_dir=a.out,
                   meta={"base_model": str(Path(base).resolve())})
    if D.rank() == 0:
        print(f"{a.strategy}: KL {rep['losses'][0]:.4f} -> {rep['losses'][-1]:.4f} in {rep['steps']} steps "
              f"({rep['seconds']} s), {sum(rep['codes_changed'])} code changes: {a.out}")


def _load_model_or_checkpoint(path, base, dev) -> tuple:
    """(model, directory holding its tokenizer) for a Hugging Face model directory or one of our checkpoints."""
    from llm.checkpoint import load_checkpoint
    from llm.model import load_model

    path = Path(path)
    if (path / "meta.json").exists():
        model, meta, _ = load_checkpoint(path, base, dev)
        return model, base or meta["base_model"]
    return load_model(path, torch.float32, dev), path


def cmd_eval(a) -> None:
    from llm.evaluate import perplexity
    from llm.pipeline import validation_windows

    dev = _device(a.device)
    path = Path(a.model)
    model, tok_dir = _load_model_or_checkpoint(path, a.base, dev)
    val = validation_windows(tok_dir, a.validation, a.seq_len, a.eval_windows)
    dtype = torch.bfloat16 if a.bf16 and dev.type == "cuda" else None
    ppl = perplexity(model, val, batch_size=a.batch_size, device=dev, dtype=dtype)
    print(json.dumps({"model": str(path), "perplexity": ppl, "seq_len": a.seq_len, "windows": len(val)}))


def cmd_generate(a) -> None:
    from llm.model import load_tokenizer
    from llm.generate import GreedyDecoder, prepare_for_inference

    dev = _device(a.device)
    model, tok_dir = _load_model_or_checkpoint(a.model, a.base, dev)
    prepare_for_inference(model, torch.bfloat16 if a.bf16 else None)
    tok = load_tokenizer(tok_dir)
    prompt = torch.tensor([tok.encode(a.prompt, add_special_tokens=False)], dtype=torch.long)
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty after tokenization")
    decoder = GreedyDecoder(model, prompt.shape[1] + a.new_tokens, cuda_graph=False if a.no_cuda_graph else None)
    out = decoder.generate(prompt, a.new_tokens)
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    print(json.dumps({"model": str(a.model), "new_tokens": a.new_tokens, "cuda_graph": decoder.cuda_graph,
                      "tokens_per_s": round(1 / decoder.last_seconds_per_token, 1)}), file=sys.stderr)


def cmd_export(a) -> None:
    from llm.checkpoint import load_checkpoint
    from llm.export import export_aqlm

    model, meta, _ = load_checkpoint(a.checkpoint, a.model, "cpu")
    out = export_aqlm(model, a.model or meta["base_model"], a.out)
    print(f"exported to {out} (Hugging Face AQLM format)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pvtuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, data=True):
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        p.add_argument("--seed", type=int, default=0)
        if data:
            p.add_argument("--seq-len", type=int, default=512)
            p.add_argument("--nsamples", type=int, default=1024, help="calibration sequences")

    def calib_args(p):
        p.add_argument("--format", default="2x8g8", help="MxBgG (AQLM), vqBgG, intBgG (scalar)")
        p.add_argument("--rounds", type=int, default=12, help="at most this many P/V rounds per layer")
        p.add_argument("--tolerance", type=float, default=0.002, help="stop a layer's rounds below this relative gain")
        p.add_argument("--beam-width", type=int, default=4)
        p.add_argument("--block-tune-steps", type=int, default=1000)
        p.add_argument("--block-tune-lr", type=float, default=3e-4)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--true-sequential", action="store_true",
                       help="Hessians of o_proj / MLP from the block with its earlier linears quantized")
        p.add_argument("--original-targets", action="store_true",
                       help="tune each block toward the original model's activations, not the original block's "
                            "outputs on quantized inputs")

    def ft_args(p):
        p.add_argument("--steps", type=int, default=200)
        p.add_argument("--ft-batch-size", type=int, default=16, help="sequences per step, over all processes")
        p.add_argument("--ft-nsamples", type=int, default=None,
                       help="fine-tuning sequences (default: steps x ft-batch-size, fresh ones every step; "
                            "at least --nsamples)")
        p.add_argument("--micro-batch-size", type=int, default=None,
                       help="sequences per forward pass and process (gradients accumulate)")
        p.add_argument("--lr", type=float, default=3e-4)
        p.add_argument("--v-optimizer", default="adam", choices=("adam", "lamb"),
                       help="the V step's optimizer (lamb: each tensor moves by lr times its norm)")
        p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                       help="cosine: lr and p-lr decay to 0 over the steps")
        p.add_argument("--p-lr", type=float, default=1e-2)
        p.add_argument("--tau", type=float, default=0.01)
        p.add_argument("--p-beta1", type=float, default=0.0)
        p.add_argument("--p-metric", default="euclidean", choices=("euclidean", "adam"))
        p.add_argument("--p-select", default="update", choices=("update", "gain"),
                       help="pv: re-encode the groups with the largest update, or the largest decrease of the linear model")
        p.add_argument("--trust-ratio", type=float, default=None)
        p.add_argument("--freeze-other", action="store_true", help="keep embeddings and head fixed")
        p.add_argument("--grad-checkpointing", action="store_true")
        p.add_argument("--logit-chunk", type=int, default=4096,
                       help="tokens whose logits the KL loss forms at once (recomputed in backward; 0: all at once)")

    p = sub.add_parser("pipeline", help="calibrate, fine-tune with each strategy, evaluate")
    p.add_argument("model"), p.add_argument("--train", required=True), p.add_argument("--validation", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategies", default="pv", help=f"comma-separated, of {', '.join(STRATEGIES)}")
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--strategy-settings", default=None,
                   help='JSON of per-strategy overrides, e.g. {"pv": {"tau": 0.01}} (over the tuned ones)')
    p.add_argument("--untuned", action="store_true", help="do not apply the tuned per-strategy settings")
    p.add_argument("--prompts", default=None,
                   help="a text file of prompts, one a line: the summary gets each model's greedy continuation")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens of each continuation (with --prompts)")
    common(p), calib_args(p), ft_args(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("calibrate", help="one-shot block-by-block calibration")
    p.add_argument("model"), p.add_argument("--train", required=True), p.add_argument("--out", required=True)
    common(p), calib_args(p)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("finetune", help="KL fine-tuning of a calibrated checkpoint")
    p.add_argument("checkpoint"), p.add_argument("--train", required=True), p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="the original model (default: the checkpoint's base_model)")
    p.add_argument("--strategy", default="pv", choices=STRATEGIES)
    p.add_argument("--beam-width", type=int, default=4)
    common(p), ft_args(p)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("eval", help="validation perplexity of a model directory or checkpoint")
    p.add_argument("model"), p.add_argument("--validation", required=True)
    p.add_argument("--base", default=None, help="base model directory of a checkpoint")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="greedy text from a model directory or checkpoint (kernels, CUDA graphs)")
    p.add_argument("model"), p.add_argument("--prompt", required=True)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--base", default=None, help="base model directory of a checkpoint")
    p.add_argument("--bf16", action="store_true", help="run the model in bf16 (codebooks too)")
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="write the Hugging Face AQLM format")
    p.add_argument("checkpoint"), p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="base model directory (default: from the checkpoint)")
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pvtuning: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
