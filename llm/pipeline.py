"""The whole pipeline as one library call: calibrate, evaluate, fine-tune with each strategy, evaluate."""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from llm.calibrate import CalibrationConfig, calibrate_to, check_format_fits
from llm.checkpoint import (check_out, check_same_run, has_checkpoint, load_checkpoint, read_meta, remove_out,
                            weights_fingerprint)
from llm.data import calibration_sequences, check_corpus, fingerprint, tokenize, windows
from llm.evaluate import perplexity
from llm.finetune import FinetuneConfig, FinetuneError, check_resumable, describe_seconds, finetune
from llm.strategies import StrategyError, check_settings, is_strategy, settings_for, strategy_names
from llm.formats import QuantFormat, model_bits
from llm import kernels
from llm.generate import GreedyDecoder
from llm.model import load_model, load_tokenizer, model_fingerprint, read_config
from pvtheory.io import exclusive_lock, write_json


def train_tokens(model_dir, train, train_chars: Optional[int] = None) -> torch.Tensor:
    """The whole train split (or its first train_chars characters) as one token stream of the model's
    tokenizer (cached on disk by llm.data.tokenize)."""
    return tokenize(train, load_tokenizer(model_dir), max_chars=train_chars)


def train_sequences(model_dir, train, seq_len: int, nsamples: int, seed: int = 0,
                    train_chars: Optional[int] = None) -> torch.Tensor:
    """nsamples calibration sequences (nsamples, seq_len) drawn uniformly from the whole train split (or
    its first train_chars characters), tokenized with the model's tokenizer: a corpus stored source by
    source must be sampled throughout, or calibration and fine-tuning see only its first sources."""
    return calibration_sequences(train_tokens(model_dir, train, train_chars), seq_len, nsamples, seed)


def finetune_nsamples(cfg: FinetuneConfig, nsamples: int, ft_nsamples: Optional[int] = None) -> int:
    """How many fine-tuning sequences to draw: ft_nsamples if given, else steps x batch_size (every step
    sees fresh sequences rather than many passes over the calibration set), at least nsamples."""
    return ft_nsamples if ft_nsamples is not None else max(nsamples, cfg.steps * cfg.batch_size)


def validation_windows(model_dir, validation, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """The validation split as consecutive windows (n, seq_len) of the model's tokens (the first max_windows)."""
    return windows(tokenize(validation, load_tokenizer(model_dir)), seq_len, max_windows)


def load_data(model_dir, train, validation, seq_len: int, nsamples: int, max_eval_windows: Optional[int] = None,
              seed: int = 0, train_chars: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_sequences(...), validation_windows(...))."""
    return (train_sequences(model_dir, train, seq_len, nsamples, seed, train_chars),
            validation_windows(model_dir, validation, seq_len, max_eval_windows))


class PeakMemory:
    """Peak GPU memory (GiB) of each phase of a run: `with peaks("calibration"): ...` (nothing on the CPU)."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.gib: dict = {}

    @contextmanager
    def __call__(self, phase: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if cuda:
            self.gib[phase] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)


def continuations(model, tokenizer, prompts: Sequence[str], new_tokens: int, device) -> list:
    """The greedy continuation (text after the prompt) of each prompt by `model`, through the same dense
    forward as the evaluation (no decoding kernels)."""
    out, was_enabled = [], kernels.enabled()
    model = model.to(device).eval()
    kernels.set_enabled(False)
    try:
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
            decoder = GreedyDecoder(model, ids.shape[1] + new_tokens, cuda_graph=False)
            seq = decoder.generate(ids, new_tokens)
            out.append(tokenizer.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    finally:
        kernels.set_enabled(was_enabled)
    return out


def evaluate(model, val: torch.Tensor, device, amp: bool, weights: Optional[str] = None) -> float:
    """Perplexity of `model` on the windows `val`. weights: a fingerprint of the model's weights
    (model_fingerprint of a base model, fingerprint of a checkpoint's model.safetensors); with it the
    result is kept under the cache (PVTUNING_CACHE) and any later evaluation of the same weights on the
    same windows, device type and precision reads it: processes started together from one calibration
    evaluate it once, and a resumed or finished pipeline evaluates nothing twice."""
    dtype = torch.bfloat16 if amp and torch.device(device).type == "cuda" else None

    def compute() -> float:
        return perplexity(model.to(device), val, batch_size=32, device=device, dtype=dtype, progress=False)

    if weights is None:
        return compute()
    import hashlib

    from llm import data

    windows_key = hashlib.sha1(val.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    key = hashlib.sha1(f"{weights}|{windows_key}|{torch.device(device).type}|{dtype}".encode()).hexdigest()[:20]
    path = Path(data.CACHE) / f"ppl-{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no cache to keep it in
        return compute()
    with exclusive_lock(path.with_suffix(".lock")):
        try:
            return float(json.loads(path.read_text())["perplexity"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: computed again
            pass
        ppl = compute()
        try:
            write_json(path, {"perplexity": ppl, "weights": weights, "windows": list(val.shape),
                              "device": torch.device(device).type, "dtype": str(dtype)})
        except OSError:  # a read-only cache: the next evaluation computes it again
            pass
        return ppl


def strategy_config(base: FinetuneConfig, strategy: str, fmt: str, overrides: Optional[dict] = None) -> FinetuneConfig:
    """`base` for `strategy`, with that strategy's settings: its tuned values for the format `fmt`, then
    `overrides` ({setting: value}, every name checked against the strategy's settings)."""
    try:
        check_settings(strategy, overrides or {})
        settings = settings_for(strategy, QuantFormat.parse(fmt), overrides)
    except StrategyError as e:
        raise FinetuneError(str(e)) from None
    return replace(base, strategy=strategy, settings=settings).validate()


def run_pipeline(model_dir, train, validation, out_dir, calib: CalibrationConfig, finetune_cfg: FinetuneConfig,
                 strategies: Sequence[str] = ("pv",), seq_len: int = 512, nsamples: int = 1024,
                 max_eval_windows: Optional[int] = None, device=None, progress: bool = True,
                 strategy_settings: Optional[dict] = None, ft_nsamples: Optional[int] = None,
                 prompts: Sequence[str] = (), new_tokens: int = 32, overwrite: bool = False) -> dict:
    """Calibrate `model_dir` on nsamples sequences, then fine-tune the calibrated model with each strategy
    at equal steps and data (finetune_nsamples(...) other sequences of the train split); checkpoints
    under out_dir/, summary in out_dir/summary.json. Resumes finished parts.
    Each strategy runs at its tuned settings for the format (llm.strategies), with strategy_settings
    ({strategy: {setting: value}}) on top. prompts: greedy continuations of new_tokens
    tokens by the original, the calibrated and each fine-tuned model go to the summary, side by side.
    The summary also records seconds per phase and fine-tuning step, and peak GPU memory per phase.
    out_dir must be new, empty, or a run of this pipeline with the same model, data and settings (it is
    resumed); overwrite=True replaces whatever is there."""
    read_config(model_dir)  # everything is checked before any work or any write
    if not strategies:
        raise FinetuneError("no strategy to run: name at least one")
    calib.validate()
    check_format_fits(model_dir, calib)
    configs = {s: strategy_config(finetune_cfg, s, calib.fmt, (strategy_settings or {}).get(s)) for s in strategies}
    for name in strategy_settings or {}:
        if not is_strategy(name):
            raise FinetuneError(f"strategy settings name an unknown strategy {name!r}; known: {', '.join(strategy_names())}")
    for path, what in ((train, "train corpus"), (validation, "validation corpus")):
        check_corpus(path, what)
    if seq_len < 2 or nsamples < 1 or (max_eval_windows is not None and max_eval_windows < 1) or new_tokens < 1:
        raise ValueError("seq_len must be >= 2 and nsamples, eval windows and new_tokens >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    check_out(out, overwrite, allow=is_pipeline_out)
    n_ft = finetune_nsamples(finetune_cfg, nsamples, ft_nsamples)
    calibrated = out / "calibrated"
    run = calibration_run(model_dir, train, seq_len, nsamples, calib)
    if not overwrite:
        for ck in (calibrated, out / "calibrated.partial"):
            if has_checkpoint(ck):
                check_same_run(ck, read_meta(ck).get("run"), run)
        resumed = [s for s in strategies if has_checkpoint(out / s)]
        if resumed and not has_checkpoint(calibrated):
            raise FinetuneError(f"{out / resumed[0]} holds a fine-tuning run but {calibrated} is missing: "
                                "give another --out, or --overwrite to start over")
        if resumed:
            ft_run = finetune_run(model_dir, calibrated, train, seq_len, n_ft)  # one identity for every strategy
            for strategy in resumed:
                check_resumable(out / strategy, configs[strategy], ft_run)
    amp = finetune_cfg.amp
    t0 = time.time()
    tokens = train_tokens(model_dir, train)  # one stream, two independent draws from it
    seqs = calibration_sequences(tokens, seq_len, nsamples, calib.seed)
    ft_seqs = calibration_sequences(tokens, seq_len, n_ft, calib.seed + 1)
    del tokens
    val = validation_windows(model_dir, validation, seq_len, max_eval_windows)
    tokenizer = load_tokenizer(model_dir)
    peaks = PeakMemory(device)
    teacher = load_model(model_dir, torch.float32, device)
    summary = {"model": str(model_dir), "format": calib.fmt, "seq_len": seq_len, "nsamples": nsamples,
               "ft_nsamples": n_ft,
               "eval_windows": len(val), "device": str(device), "calibration": asdict(calib),
               "finetune": asdict(finetune_cfg), "strategy_settings": strategy_settings or {}}
    summary["ppl_original"] = evaluate(teacher, val, device, amp, weights=model_fingerprint(model_dir))
    texts = {"prompts": list(prompts)}
    if prompts:
        texts["original"] = continuations(teacher, tokenizer, prompts, new_tokens, device)
    if overwrite:  # only now, with the data read and the models loaded: a bad input loses nothing
        remove_out(out)
    if has_checkpoint(calibrated):
        student, meta, _ = load_checkpoint(calibrated, model_dir, device)
        summary["calibration_seconds"] = meta.get("calibration_seconds")
        summary["calibration_phase_seconds"] = meta.get("calibration", {}).get("phase_seconds")
        summary["calibration"] = meta.get("calibration", {}).get("config", summary["calibration"])  # what it was made with
    else:  # resumes from calibrated.partial: the blocks an interrupted run finished
        student = load_model(model_dir, torch.float32, "cpu")
        with peaks("calibration"):
            report = calibrate_to(calibrated, student, seqs, calib, {"base_model": str(Path(model_dir).resolve()),
                                                                     "run": run}, device=device, progress=progress)
        summary["calibration_seconds"] = report["seconds"]
        summary["calibration_phase_seconds"] = report["phase_seconds"]
    summary["bits"] = model_bits(student)
    with peaks("evaluation"):
        summary["ppl_calibrated"] = evaluate(student, val, device, amp, weights=weights_fingerprint(calibrated))
    if prompts:
        texts["calibrated"] = continuations(student, tokenizer, prompts, new_tokens, device)
    summary["runs"] = {}
    ft_run = finetune_run(model_dir, calibrated, train, seq_len, n_ft)
    for strategy in strategies:
        s = copy.deepcopy(student)
        with peaks(f"finetune_{strategy}"):
            rep = finetune(s, teacher, ft_seqs, configs[strategy], device=device, checkpoint_dir=out / strategy,
                           meta={"base_model": str(Path(model_dir).resolve()), "run": ft_run}, progress=progress)
        steps_run = len(rep["losses"]) - rep["resumed_at"]
        if rep["seconds"] is not None and rep["losses"]:  # every step's time, a resumed run's earlier calls included
            rep["seconds_per_step"] = round(rep["seconds"] / len(rep["losses"]), 3)
        else:
            rep["seconds_per_step"] = round(rep["seconds_this_call"] / steps_run, 3) if steps_run > 0 else None
        rep["ppl"] = evaluate(s, val, device, amp, weights=weights_fingerprint(out / strategy))
        if prompts:
            texts[strategy] = continuations(s, tokenizer, prompts, new_tokens, device)
        rep["loss_first_last"] = [rep["losses"][0], sum(rep["losses"][-10:]) / len(rep["losses"][-10:])] if rep["losses"] else []
        rep["codes_changed_total"] = int(sum(rep["codes_changed"]))
        summary["runs"][strategy] = rep
        del s
        summary["peak_gpu_gib"], summary["continuations"] = peaks.gib, texts
        write_json(out / "summary.json", summary)
    summary["peak_gpu_gib"], summary["continuations"] = peaks.gib, texts
    summary["seconds_total"] = round(time.time() - t0, 1)
    write_json(out / "summary.json", summary)
    return summary


def is_pipeline_out(path) -> bool:
    """A folder written by run_pipeline: summary.json, calibrated/ (or an unfinished calibrated.partial/) and one
    folder per strategy, nothing else."""
    names = {f.name for f in Path(path).iterdir() if not f.name.startswith(".")}
    return bool(names) and names <= {"summary.json", "calibrated", "calibrated.partial", *strategy_names()} and (
        bool(names & {"summary.json", "calibrated", "calibrated.partial"}))


def calibration_run(model, train, seq_len: int, nsamples: int, calib: CalibrationConfig) -> dict:
    """What a calibrated checkpoint must share with a run that resumes or reuses it: the base model (its
    fingerprint), the data and the calibration settings."""
    return {"base_model": model_fingerprint(model), "train": fingerprint(train), "seq_len": seq_len,
            "nsamples": nsamples, "calibration": asdict(calib)}


def finetune_run(model, start, train, seq_len: int, ft_nsamples: int) -> dict:
    """What a fine-tuning checkpoint must share with a run that resumes it (besides its fine-tuning settings):
    the base model, the checkpoint it started from (its weights' fingerprint) and the data."""
    return {"base_model": model_fingerprint(model), "start": weights_fingerprint(start),
            "train": fingerprint(train), "seq_len": seq_len, "ft_nsamples": ft_nsamples}


def format_summary(summary: dict) -> str:
    lines = [f"model {summary['model']}, format {summary['format']} "
             f"({summary['bits']['bits_per_quantized_weight']:.3f} bits per quantized weight)",
             f"  original        ppl {summary['ppl_original']:8.3f}",
             f"  calibrated      ppl {summary['ppl_calibrated']:8.3f}   ({summary.get('calibration_seconds')} s)"]
    for name, r in summary.get("runs", {}).items():
        lines.append(f"  {name:15s} ppl {r['ppl']:8.3f}   ({r['steps']} steps, {describe_seconds(r)}, "
                     f"{r['codes_changed_total']} code changes)")
    return "\n".join(lines)
