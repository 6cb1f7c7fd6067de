"""pvtuning: compress a Llama/Mistral model to 1-2 bits per weight and fine-tune it with PV-Tuning.

    pvtuning pipeline MODEL --train TRAIN --validation VAL --out DIR [--format 2x8g8] [--strategies pv,ste]
    pvtuning calibrate MODEL --train TRAIN --out CKPT [--format 2x8g8]
    pvtuning finetune CKPT --train TRAIN --out CKPT2 [--strategy pv] [--steps 200]
    torchrun --nproc-per-node 2 -m llm.cli finetune ...   (data parallel over 2 GPUs, same result)
    pvtuning eval MODEL_OR_CKPT --validation VAL
    pvtuning generate MODEL_OR_CKPT --prompt TEXT [--new-tokens 64] [--bf16]
    pvtuning export CKPT --out HF_DIR

MODEL: a Hugging Face model directory, a GGUF file (dequantized to float by transformers' GGUF
loader; needs pip install 'pvtuning[gguf]'), or a folder holding one GGUF file.
TRAIN / VAL: .txt, .txt.xz, .jsonl (a "text" field), .parquet (a "text" column), or a folder written
by datasets' save_to_disk.
Every input is checked before any work starts; a bad one is one line on stderr and exit code 2, with
nothing written. --out never replaces what this tool did not write (unless --overwrite), and a rerun
of the same command resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

from llm.calibrate import CalibrationConfig
from llm.finetune import FinetuneConfig
from llm.model import first_line
from llm.strategies import strategy_names

EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, KeyError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"pvtuning: error: {message} (see {self.prog} --help)\n")


def _number(kind, low, low_ok: bool, what: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v < low or (v == low and not low_ok):
            raise argparse.ArgumentTypeError(f"must be {'>=' if low_ok else '>'} {low}, got {text}")
        return v
    return parse


POSITIVE_INT = _number(int, 1, True, "an integer")
SEQ_LEN = _number(int, 2, True, "an integer")  # a window predicts seq_len - 1 tokens
NONNEG_INT = _number(int, 0, True, "an integer")
POSITIVE = _number(float, 0.0, False, "a number")
NONNEG = _number(float, 0.0, True, "a number")


def _device(arg):
    """torch.device of --device, checked to exist here."""
    try:
        dev = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {arg!r} is not a device: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {arg!r} is not supported: use cpu or cuda")
    return dev


def _corpus(path, flag: str) -> None:
    from llm.data import check_corpus

    check_corpus(path, flag)


def _preset(a) -> dict:
    """The preset's settings with every explicit flag on top (argparse leaves unset ones at None)."""
    from llm.presets import preset_for

    p = preset_for(a.format, a.preset)
    for key in ("nsamples", "rounds", "tolerance", "block_tune_steps", "steps", "batch_size", "micro_batch_size",
                "v_optimizer", "lr"):
        if getattr(a, key, None) is not None:
            p[key] = getattr(a, key)
    return p


def _calib_cfg(a) -> CalibrationConfig:
    p = _preset(a)
    return CalibrationConfig(fmt=a.format, rounds=p["rounds"], tolerance=p["tolerance"],
                             beam_width=a.beam_width if a.beam_width is not None else 4,
                             block_tune_steps=p["block_tune_steps"], block_tune_lr=a.block_tune_lr,
                             forward_batch_size=a.calib_batch_size, seed=a.seed, true_sequential=a.true_sequential,
                             original_targets=a.original_targets).validate()


def _ft_cfg(a, strategy: str) -> FinetuneConfig:
    """The fine-tuning loop's settings (the strategy's own come from strategy_overrides)."""
    p = _preset(a)
    return FinetuneConfig(strategy=strategy, steps=p["steps"], batch_size=p["batch_size"],
                          micro_batch_size=p["micro_batch_size"], lr=p["lr"], lr_schedule=a.lr_schedule,
                          v_optimizer=p["v_optimizer"], train_other=not a.freeze_other,
                          shard_teacher=not getattr(a, "replicate_teacher", False), p_grad_dtype=a.p_grad_dtype,
                          grad_checkpointing=a.grad_checkpointing, logit_chunk=a.logit_chunk or None,
                          seed=a.seed).validate()


def strategy_overrides(a, strategies) -> dict:
    """{strategy: {setting: value}} over each strategy's tuned settings: the preset's (codebook formats), then the
    setting flags given on the command line (each applies to every strategy that has that setting), then
    --strategy-settings; every name checked."""
    from llm.presets import preset_strategy_settings
    from llm.strategies import check_settings, get_strategy, setting_fields

    fields_of = {name: {f.name for f in dataclasses.fields(get_strategy(name).settings)} for name in strategies}
    flags = {k: getattr(a, k) for k in setting_fields() if getattr(a, k, None) is not None}
    extra = {}
    if a.strategy_settings:
        try:
            extra = json.loads(a.strategy_settings)
        except json.JSONDecodeError as e:
            raise ValueError(f"--strategy-settings is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError('--strategy-settings must look like {"pv": {"p_fraction": 0.01}}')
        for name, values in extra.items():
            check_settings(name, values)
    preset = preset_strategy_settings(_preset(a), a.format)
    out = {}
    for name in strategies:
        values = {k: v for k, v in preset.get(name, {}).items() if k in fields_of[name]}
        values.update({k: v for k, v in flags.items() if k in fields_of[name]})
        values.update(extra.get(name, {}))
        out[name] = values
    return out


def _add_setting_flags(p) -> None:
    """One flag per setting of the registered strategies (--p-lr, --p-fraction, ... and a plugin's own), generated
    from their settings dataclasses: the same name from flag to field to JSON."""
    from llm.strategies import default_value, setting_fields

    parse = {"float": float, "int": int, "str": str, "Optional[float]": float, "Optional[int]": int}
    for name, (f, owners) in setting_fields().items():
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = parse.get(type_name.replace("typing.", ""), str)
        defaults = ", ".join(f"{o} {default_value(_field_of(o, name))}" for o in owners)
        typed = kind if kind is str else _number(kind, -math.inf, True, "a number")  # ranges: check_settings
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typed, default=None,
                       choices=f.metadata.get("choices"),
                       help=f"{f.metadata.get('help', name)} (defaults: {defaults}; tuned per format)")


def _field_of(strategy: str, name: str):
    from llm.strategies import get_strategy

    return next(f for f in dataclasses.fields(get_strategy(strategy).settings) if f.name == name)


def _read_prompts(path) -> list:
    """The non-empty lines of a text file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {p} has no non-empty line")
    return prompts


def _strategies(text: str, flag: str = "--strategies") -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = strategy_names()
    if not names:
        raise ValueError(f"{flag} {text!r} names no strategy; choose from {', '.join(known)}")
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"{flag}: unknown strategy {unknown[0]!r}; choose from {', '.join(known)} "
                         "(or register yours in a module given to --import)")
    return names


def import_plugins(modules) -> None:
    """Import each --import module (a dotted name, or a .py file) for what it registers (strategies)."""
    import importlib
    import importlib.util

    for name in modules or ():
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {name}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except Exception as e:  # the user's code: any error it raises is reported on one line
            text = str(e).strip().splitlines()
            raise ValueError(f"--import {name}: {type(e).__name__}: {text[0] if text else ''}") from None


def cmd_pipeline(a) -> None:
    from llm.pipeline import format_summary, run_pipeline

    strategies = _strategies(a.strategies)
    prompts = _read_prompts(a.prompts) if a.prompts else ()
    for path, flag in ((a.train, "--train"), (a.validation, "--validation")):
        _corpus(path, flag)
    summary = run_pipeline(a.model, a.train, a.validation, a.out, _calib_cfg(a), _ft_cfg(a, strategies[0]), strategies,
                           a.seq_len, _preset(a)["nsamples"], a.eval_windows, _device(a.device),
                           strategy_settings=strategy_overrides(a, strategies), ft_nsamples=a.ft_nsamples,
                           prompts=prompts, new_tokens=a.new_tokens, overwrite=a.overwrite)
    print(format_summary(summary))
    print(f"summary: {Path(a.out) / 'summary.json'}")


def cmd_calibrate(a) -> None:

    from llm import distributed as D
    from llm.calibrate import calibrate_to, check_format_fits
    from llm.checkpoint import check_out, check_same_run, is_checkpoint, partial_path, read_meta, remove_out
    from llm.formats import model_bits
    from llm.model import load_model, read_config
    from llm.pipeline import calibration_run, train_sequences

    read_config(a.model)
    cfg = _calib_cfg(a)
    check_format_fits(a.model, cfg)
    _corpus(a.train, "--train")
    dev = D.init_from_env() if D.launched_by_torchrun() else _device(a.device)
    check_out(a.out, a.overwrite)
    check_out(partial_path(a.out), a.overwrite)  # an interrupted run's blocks, or nothing
    nsamples = _preset(a)["nsamples"]
    run = calibration_run(a.model, a.train, a.seq_len, nsamples, cfg)
    if is_checkpoint(a.out) and not a.overwrite:
        check_same_run(a.out, read_meta(a.out).get("run"), run)
        print(f"{a.out} already holds this calibration (--overwrite to redo it)")
        return
    seqs = train_sequences(a.model, a.train, a.seq_len, nsamples, cfg.seed)  # the draw the pipeline makes
    model = load_model(a.model, torch.float32, "cpu")
    if a.overwrite and D.rank() == 0:
        remove_out(partial_path(a.out))
    # resumable: after each block the calibrated blocks go to OUT.partial, which a rerun continues from
    report = calibrate_to(a.out, model, seqs, cfg, {"base_model": str(Path(a.model).resolve()), "run": run}, device=dev)
    if D.rank() > 0:  # every rank holds the same model; the first wrote it
        return
    print(f"calibrated {a.model} to {a.format} ({model_bits(model)['bits_per_quantized_weight']:.3f} bits per "
          f"quantized weight) in {report['seconds']} s: {a.out}")


def cmd_finetune(a) -> None:
    from llm import distributed as D
    from llm.checkpoint import check_out, load_checkpoint, read_meta, remove_out
    from llm.finetune import check_resumable, describe_seconds, finetune
    from llm.model import load_model, read_config
    from llm.pipeline import finetune_nsamples, finetune_run, strategy_config, train_sequences

    _strategies(a.strategy, "--strategy")
    meta = read_meta(a.checkpoint)
    a.format = meta.get("calibration", {}).get("format") or next(iter(meta.get("quantized_layers", {}).values()), "")
    base = a.model or meta.get("base_model")
    if base is None:
        raise ValueError(f"{a.checkpoint} names no base model: pass --model")
    read_config(base)
    cfg = strategy_config(_ft_cfg(a, a.strategy), a.strategy, a.format, strategy_overrides(a, [a.strategy])[a.strategy])
    _corpus(a.train, "--train")
    dev = D.init_from_env() if D.launched_by_torchrun() else _device(a.device)
    check_out(a.out, a.overwrite)
    n = finetune_nsamples(cfg, _preset(a)["nsamples"], a.ft_nsamples)
    run = finetune_run(base, a.checkpoint, a.train, a.seq_len, n)
    if not a.overwrite:
        check_resumable(a.out, cfg, run)
    student, meta, _ = load_checkpoint(a.checkpoint, base, dev)
    seqs = train_sequences(base, a.train, a.seq_len, n, a.seed + 1)
    # a teacher sharded over the processes is loaded on the CPU: sharding moves only each process's shards
    teacher = load_model(base, torch.float32, "cpu" if D.is_distributed() and cfg.shard_teacher else dev)
    if a.overwrite:  # only now, with the data read and the models loaded
        if D.rank() == 0:
            remove_out(a.out)
        D.barrier()
    rep = finetune(student, teacher, seqs, cfg, device=dev, checkpoint_dir=a.out,
                   meta={"base_model": str(Path(base).resolve()), "run": run})
    if D.rank() == 0:
        print(f"{a.strategy}: KL {rep['losses'][0]:.4f} -> {rep['losses'][-1]:.4f} in {rep['steps']} steps "
              f"({describe_seconds(rep)}), {sum(rep['codes_changed'])} code changes: {a.out}")


def _load_model_or_checkpoint(path, base, dev) -> tuple:
    """(model, the model its tokenizer comes from) for a model (directory or GGUF) or one of our checkpoints."""
    from llm.checkpoint import has_checkpoint, load_checkpoint
    from llm.model import load_model

    path = Path(path)
    if has_checkpoint(path):
        model, meta, _ = load_checkpoint(path, base, dev)
        return model, base or meta["base_model"]
    return load_model(path, torch.float32, dev), path


def cmd_eval(a) -> None:
    from llm.evaluate import perplexity
    from llm.pipeline import validation_windows

    _corpus(a.validation, "--validation")
    dev = _device(a.device)
    path = Path(a.model)
    model, tok_dir = _load_model_or_checkpoint(path, a.base, dev)
    val = validation_windows(tok_dir, a.validation, a.seq_len, a.eval_windows)
    dtype = torch.bfloat16 if a.bf16 and dev.type == "cuda" else None
    ppl = perplexity(model, val, batch_size=a.batch_size, device=dev, dtype=dtype)
    print(json.dumps({"model": str(path), "perplexity": ppl, "seq_len": a.seq_len, "windows": len(val)}))


def cmd_generate(a) -> None:
    from llm.generate import GreedyDecoder, prepare_for_inference
    from llm.model import load_tokenizer

    if not a.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue")
    dev = _device(a.device)
    model, tok_dir = _load_model_or_checkpoint(a.model, a.base, dev)
    prepare_for_inference(model, torch.bfloat16 if a.bf16 else None)
    fused = 0
    if not a.no_fuse:  # the model is only decoded here: its layers may share storage
        from llm.fuse import fuse_shared_inputs
        fused = fuse_shared_inputs(model)
    tok = load_tokenizer(tok_dir)
    prompt = torch.tensor([tok.encode(a.prompt, add_special_tokens=False)], dtype=torch.long)
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty after tokenization")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt.shape[1] + a.new_tokens > limit:
        raise ValueError(f"the prompt ({prompt.shape[1]} tokens) + --new-tokens {a.new_tokens} exceed the model's "
                         f"{limit} positions: ask for fewer tokens")
    decoder = GreedyDecoder(model, prompt.shape[1] + a.new_tokens, cuda_graph=False if a.no_cuda_graph else None,
                            compile=a.compile)
    out = decoder.generate(prompt, a.new_tokens)
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    print(json.dumps({"model": str(a.model), "new_tokens": a.new_tokens, "cuda_graph": decoder.cuda_graph,
                      "fused_launches": fused, "tokens_per_s": round(1 / decoder.last_seconds_per_token, 1)}), file=sys.stderr)


def cmd_export(a) -> None:
    from llm.checkpoint import check_out, load_checkpoint, read_meta
    from llm.export import export_aqlm, is_export

    meta = read_meta(a.checkpoint)
    check_out(a.out, a.overwrite, allow=is_export)
    model, meta, _ = load_checkpoint(a.checkpoint, a.model, "cpu")
    out = export_aqlm(model, a.model or meta["base_model"], a.out)  # swapped in whole: replaces what --overwrite allows
    print(f"exported to {out} (Hugging Face AQLM format)")


def build_parser() -> argparse.ArgumentParser:
    from llm.presets import describe

    ap = Parser(prog="pvtuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    def sub_parser(name: str, help_text: str, epilog: str = None):
        return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(p, data=True):
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the data draws and of random choices")
        if data:
            p.add_argument("--seq-len", type=SEQ_LEN, default=512, help="tokens per training sequence")
            p.add_argument("--nsamples", type=POSITIVE_INT, default=None,
                           help="calibration sequences (preset: 1024; smollm2 512)")

    def overwrite(p):
        p.add_argument("--overwrite", action="store_true",
                       help="replace whatever --out holds (by default --out must be new, empty, or this run's own)")

    def calib_args(p):
        p.add_argument("--format", default="2x8g8",
                       help="MxBgG (AQLM: M codebooks of B bits per group of G weights), vqBgG, intBgG (scalar)")
        p.add_argument("--preset", default="auto",
                       help="recipe whose settings fill every option you leave out: auto (the format's own preset, "
                            "else default), default, 2x8g8, 1x8g8, or smollm2 (SmolLM2-135M's recipe for 2x8g8 "
                            "or 1x8g8)")
        p.add_argument("--rounds", type=NONNEG_INT, default=None,
                       help="at most this many P/V rounds per layer (preset: 12; smollm2 at 2x8g8: 4)")
        p.add_argument("--tolerance", type=NONNEG, default=None,
                       help="stop a layer's rounds below this relative gain (preset: 0.002)")
        p.add_argument("--block-tune-steps", type=NONNEG_INT, default=None,
                       help="Adam steps tuning each block's continuous parameters (preset: 2x8g8 500, smollm2 100, else 1000)")
        p.add_argument("--block-tune-lr", type=POSITIVE, default=3e-4, help="learning rate of block tuning")
        p.add_argument("--calib-batch-size", type=POSITIVE_INT, default=16, help="sequences per calibration forward pass")
        p.add_argument("--true-sequential", action="store_true",
                       help="Hessians of o_proj / MLP from the block with its earlier linears quantized")
        p.add_argument("--original-targets", action="store_true",
                       help="tune each block toward the original model's activations, not the original block's "
                            "outputs on quantized inputs")

    def ft_args(p):
        p.add_argument("--steps", type=POSITIVE_INT, default=None,
                       help="fine-tuning steps (preset: 2x8g8 260, 1x8g8 220, else 200; smollm2 280 / 250)")
        p.add_argument("--ft-batch-size", dest="batch_size", type=POSITIVE_INT, default=None,
                       help="sequences per step, over all processes (preset: 2x8g8 128, else 64)")
        p.add_argument("--ft-nsamples", type=POSITIVE_INT, default=None,
                       help="fine-tuning sequences (default: steps x ft-batch-size, fresh ones every step; "
                            "at least --nsamples)")
        p.add_argument("--micro-batch-size", type=POSITIVE_INT, default=None,
                       help="sequences per forward pass and process; gradients accumulate (preset: 64)")
        p.add_argument("--lr", type=POSITIVE, default=None, help="the V step's learning rate (preset: 1e-3)")
        p.add_argument("--v-optimizer", default=None, choices=("adam", "lamb"),
                       help="the V step's optimizer (lamb: each tensor moves by lr times its norm; preset: lamb)")
        p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                       help="cosine: lr and p-lr decay to 0 over the steps")
        p.add_argument("--strategy-settings", default=None,
                       help='JSON of per-strategy settings over the tuned ones, e.g. {"pv": {"p_fraction": 0.01}}')
        _add_setting_flags(p)  # --p-lr, --p-fraction, --p-warmup, ...: one per strategy setting
        p.add_argument("--freeze-other", action="store_true", help="keep embeddings and head fixed")
        p.add_argument("--p-grad-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="under torchrun: precision in which dL/dW is summed onto each layer's owner")
        p.add_argument("--replicate-teacher", action="store_true",
                       help="under torchrun: a whole teacher in every process instead of its layers sharded (FSDP2)")
        p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (memory)")
        p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="a module (dotted name or .py file) to import first, e.g. one that registers a strategy "
                            "with llm.strategies.register_strategy; repeatable")
        p.add_argument("--logit-chunk", type=NONNEG_INT, default=4096,
                       help="tokens whose logits the KL loss forms at once (recomputed in backward; 0: all at once)")

    p = sub_parser("pipeline", "calibrate, fine-tune with each strategy, evaluate",
                   "presets (each measured at validation perplexity, sequence length 512, one GPU):\n" + describe())
    p.add_argument("model", help="Hugging Face model directory, GGUF file, or folder holding one GGUF file")
    p.add_argument("--train", required=True, help="train text (.txt, .txt.xz, .jsonl, .parquet, datasets folder)")
    p.add_argument("--validation", required=True, help="validation text (same kinds as --train)")
    p.add_argument("--out", required=True, help="output folder: checkpoints and summary.json")
    p.add_argument("--strategies", default="pv",
                   help=f"comma-separated, of {', '.join(strategy_names())} or one registered by --import")
    p.add_argument("--eval-windows", type=POSITIVE_INT, default=None, help="evaluate on the first N windows only")
    p.add_argument("--prompts", default=None,
                   help="a text file of prompts, one a line: the summary gets each model's greedy continuation")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=32, help="tokens of each continuation (with --prompts)")
    common(p), calib_args(p), ft_args(p), overwrite(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub_parser("calibrate", "one-shot block-by-block calibration")
    p.add_argument("model", help="Hugging Face model directory, GGUF file, or folder holding one GGUF file")
    p.add_argument("--train", required=True, help="train text (.txt, .txt.xz, .jsonl, .parquet, datasets folder)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--beam-width", type=POSITIVE_INT, default=None, help="beam of the code search (AQLM; default 4)")
    common(p), calib_args(p), overwrite(p)
    p.set_defaults(fn=cmd_calibrate)

    p = sub_parser("finetune", "KL fine-tuning of a calibrated checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder written by calibrate (or finetune)")
    p.add_argument("--train", required=True, help="train text (.txt, .txt.xz, .jsonl, .parquet, datasets folder)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (resumed if it holds this run)")
    p.add_argument("--model", default=None, help="the original model (default: the checkpoint's base_model)")
    p.add_argument("--strategy", default="pv",
                   help=f"how codes change during fine-tuning: {', '.join(strategy_names())} or one registered by --import")
    p.add_argument("--preset", default="auto", help="recipe filling the options you leave out (see pipeline --help)")
    common(p), ft_args(p), overwrite(p)
    p.set_defaults(fn=cmd_finetune)

    p = sub_parser("eval", "validation perplexity of a model or checkpoint")
    p.add_argument("model", help="model (directory or GGUF) or checkpoint folder")
    p.add_argument("--validation", required=True, help="validation text (.txt, .txt.xz, .jsonl, .parquet, datasets folder)")
    p.add_argument("--base", default=None, help="base model of a checkpoint (default: the one it names)")
    p.add_argument("--seq-len", type=SEQ_LEN, default=512, help="tokens per window")
    p.add_argument("--eval-windows", type=POSITIVE_INT, default=None, help="the first N windows only")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="windows per forward pass")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on a GPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.set_defaults(fn=cmd_eval)

    p = sub_parser("generate", "greedy text from a model or checkpoint (kernels, CUDA graphs)")
    p.add_argument("model", help="model (directory or GGUF) or checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=64, help="tokens to generate")
    p.add_argument("--base", default=None, help="base model of a checkpoint (default: the one it names)")
    p.add_argument("--bf16", action="store_true", help="run the model in bf16 (codebooks too)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode without capturing a CUDA graph")
    p.add_argument("--no-fuse", action="store_true",
                   help="one GPU kernel launch per layer (default: a block's q, k and v in one, gate and up where faster; llm.fuse)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: about 20 s to compile, then 1.4-2.1x the tokens/s on an H200 (docs/kernels.md)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.set_defaults(fn=cmd_generate)

    p = sub_parser("export", "write the Hugging Face AQLM format (transformers + aqlm load it)")
    p.add_argument("checkpoint", help="a checkpoint folder with AQLM or VQ layers")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--model", default=None, help="base model (default: the one the checkpoint names)")
    overwrite(p)
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)  # --import first: a plugin's strategy settings become flags
    pre.add_argument("--import", dest="imports", action="append")
    try:
        import_plugins(pre.parse_known_args(argv)[0].imports)
    except EXPECTED_ERRORS as e:
        print(f"pvtuning: error: {first_line(e)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        with stopping_on_sigterm(), _holding(getattr(args, "out", None)):
            args.fn(args)
        from llm import distributed as D

        if D.launched_by_torchrun():  # every rank done: the process group closed before the interpreter ends
            D.leave()
    except KeyboardInterrupt as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"pvtuning: stopped by {how}: the last checkpoint is intact; rerun the same command to resume",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except EXPECTED_ERRORS as e:
        print(f"pvtuning: error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (so that it unwinds like Ctrl-C: atomic writes roll back)."""


@contextlib.contextmanager
def stopping_on_sigterm():
    """While the block runs, SIGTERM raises Terminated (where the default would end the process on the spot);
    the previous handler comes back afterwards. Only in the main thread, and only over the default handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def on_sigterm(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _holding(out):
    """The --out lock (llm.runlock) in the process that writes --out (under torchrun: rank 0), else nothing."""
    from llm.runlock import holding_out

    if out is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return holding_out(out)


if __name__ == "__main__":
    sys.exit(main())
