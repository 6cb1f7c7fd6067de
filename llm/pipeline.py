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
from llm.checkpoint import check_out, check_same_run, has_checkpoint, load_checkpoint, read_meta, remove_out
from llm.data import calibration_sequences, check_corpus, fingerprint, tokenize, windows
from llm.evaluate import perplexity
from llm.finetune import FinetuneConfig, FinetuneError, check_resumable, describe_seconds, finetune
from llm.strategies import is_strategy, strategy_names
from llm.formats import QuantFormat, model_bits
from llm import kernels
from llm.generate import GreedyDecoder
from llm.model import load_model, load_tokenizer, model_fingerprint, model_source, read_config
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


# Per-strategy P-step settings found by sweeps on ref-llama (2x8g8 and 1x8g8, docs/results.md):
# PV-Tuning moves few codes per step (tau = 0.1%), with momentum and the Adam metric against noisy
# small-batch gradients; STE and stochastic rounding need small steps or they wreck the model.
# With Adam's bias correction the first P step's update is p_lr x sign(dL/dW) in every coordinate, so the
# first P step re-encodes thousands of groups at once and the loss jumps (SmolLM2-135M vq10g8 at p_lr 0.1:
# KL 1.52 -> 8.10; ref-llama 2x8g8 at 3e-2: 0.066 -> 0.103). Five steps that only gather the moments
# first (p_warmup) remove the jump on codebooks at both widths (docs/representations.md): vq10g8 28.96
# against 31.70 without (continuous-only 28.74), ref-llama 2x8g8 17.01 against 17.05 (continuous-only
# 17.12), each on one calibration; on CPU proxies too.
TUNED_STRATEGY_SETTINGS = {
    "pv": {"p_lr": 1e-2, "tau": 1e-3, "p_beta1": 0.9, "p_metric": "adam", "p_warmup": 5},
    "linearized_pv": {"p_lr": 1e-2, "p_beta1": 0.9, "p_metric": "adam"},
    "ste": {"p_lr": 3e-4},
    "stochastic": {"p_lr": 1e-4},
}
# About 1 bit per weight (codes of <= 1.5 bits per weight) the P steps must be ~10x larger to move
# codes at all on the reference models, and the P step's momentum 0.95 beat 0.9 / 0.97 / 0.99 at 16
# sequences per step; at 2 bits the larger step hurts, so this applies to the low-bit formats only
# (ref-llama 1x8g8: PV 20.35 vs STE 20.61 at 16 sequences, 19.68 vs 20.46 at 64). On SmolLM2-135M this
# low-bit step moved too many codes (47.5 against 43.1 at the 2-bit setting: docs/results_smollm2.md).
# At 2 bits and 64-128 sequences per step PV's p_lr 3e-2 beat 1e-2 (17.19 vs 17.29), not at 16 sequences
# (17.38 vs 17.36): the 2x8g8 preset (llm/presets.py) sets it with its batch of 128.
LOW_BIT_OVERRIDES = {"pv": {"p_lr": 0.1, "p_beta1": 0.95}, "ste": {"p_lr": 1e-3}}
# On GPTQ's scalar grid one code step moves a weight by its group's whole spacing: a single P step rarely
# crosses a rounding midpoint, and when it does, the linear model overstates the gain. PV-Tuning there
# carries the rounding residual to the next P step (p_memory 1, as the official code's delta_decay 0), so
# small updates add up until a code moves, and ranks groups by the model's gain. ref-llama, H200, the
# 2x8g8 / 1x8g8 recipes (docs/representations.md): int2g128 PV 17.43 / 17.48 (two seeds) against STE
# 17.65 / 17.66 and the codebook setting's 17.87; int1g64 with momentum 0.9, PV 39.11 / 38.71 / 38.52
# against STE 39.98 / 40.12 / 40.03 on the same calibrations (momentum 0.9 at 2 bits: 17.77). These ran
# without the P warm-up, unmeasured on this grid (whose PV step is 100x smaller than on codebooks).
SCALAR_OVERRIDES = {"pv": {"p_memory": 1.0, "p_lr": 1e-3, "p_beta1": 0.0, "p_select": "gain", "p_warmup": 0}}
SCALAR_LOW_BIT_OVERRIDES = {"pv": {"p_beta1": 0.9}}


def tuned_strategy_settings(fmt: str, pv_p_lr: Optional[float] = None) -> dict:
    """TUNED_STRATEGY_SETTINGS for this format ({strategy: {FinetuneConfig field: value}}), with the
    low-bit and scalar-grid overrides where they apply. pv_p_lr: a preset's PV step size for its batch
    (llm.presets), applied to codebook formats only (the scalar grid's PV step has its own)."""
    q = QuantFormat.parse(fmt)
    code_bits = q.bits * (q.num_codebooks / q.group_size if q.kind == "aqlm" else 1)
    overrides = [LOW_BIT_OVERRIDES] if code_bits <= 1.5 else []
    if q.kind == "scalar":
        overrides += [SCALAR_OVERRIDES] + ([SCALAR_LOW_BIT_OVERRIDES] if code_bits <= 1.5 else [])
    else:
        overrides += [{"pv": {"p_lr": pv_p_lr}}] if pv_p_lr is not None else []
    settings = {k: dict(v) for k, v in TUNED_STRATEGY_SETTINGS.items()}
    for o in overrides:
        for k, v in o.items():
            settings[k].update(v)
    return settings


def check_strategy_settings(settings: Optional[dict]) -> None:
    """Every key a known strategy, every entry a dict of FinetuneConfig fields (a misspelling is an error,
    never a silently ignored setting)."""
    fields = set(FinetuneConfig.__dataclass_fields__) - {"strategy"}
    for name, entry in (settings or {}).items():
        if not is_strategy(name):
            raise FinetuneError(f"strategy settings name an unknown strategy {name!r}; known: {', '.join(strategy_names())}")
        if not isinstance(entry, dict):
            raise FinetuneError(f"strategy settings for {name} must be a JSON object of settings, got {entry!r}")
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise FinetuneError(f"strategy settings for {name}: unknown setting {unknown[0]!r}")


def strategy_config(base: FinetuneConfig, strategy: str, settings: Optional[dict] = None) -> FinetuneConfig:
    """`base` for `strategy`, with that strategy's entry of `settings` ({strategy: {field: value}}) applied."""
    check_strategy_settings(settings)
    if not is_strategy(strategy):
        raise FinetuneError(f"unknown strategy {strategy!r}; choose one of {', '.join(strategy_names())}")
    overrides = (settings or {}).get(strategy, {})
    try:
        return replace(base, strategy=strategy, **overrides).validate()
    except TypeError as e:  # a value of the wrong type meets a range check
        raise FinetuneError(f"strategy settings for {strategy}: a value has the wrong type ({e})") from None


def run_pipeline(model_dir, train, validation, out_dir, calib: CalibrationConfig, finetune_cfg: FinetuneConfig,
                 strategies: Sequence[str] = ("pv",), seq_len: int = 512, nsamples: int = 1024,
                 max_eval_windows: Optional[int] = None, device=None, progress: bool = True,
                 strategy_settings: Optional[dict] = None, ft_nsamples: Optional[int] = None,
                 prompts: Sequence[str] = (), new_tokens: int = 32, overwrite: bool = False) -> dict:
    """Calibrate `model_dir` on nsamples sequences, then fine-tune the calibrated model with each strategy
    at equal steps and data (finetune_nsamples(...) other sequences of the train split); checkpoints
    under out_dir/, summary in out_dir/summary.json. Resumes finished parts.
    strategy_settings: {strategy: {FinetuneConfig field: value}} applied over finetune_cfg for that
    strategy only (e.g. tuned_strategy_settings(calib.fmt)). prompts: greedy continuations of new_tokens
    tokens by the original, the calibrated and each fine-tuned model go to the summary, side by side.
    The summary also records seconds per phase and fine-tuning step, and peak GPU memory per phase.
    out_dir must be new, empty, or a run of this pipeline with the same model, data and settings (it is
    resumed); overwrite=True replaces whatever is there."""
    read_config(model_dir)  # everything is checked before any work or any write
    if not strategies:
        raise FinetuneError("no strategy to run: name at least one")
    calib.validate()
    check_format_fits(model_dir, calib)
    configs = {s: strategy_config(finetune_cfg, s, strategy_settings) for s in strategies}
    for path, what in ((train, "train corpus"), (validation, "validation corpus")):
        check_corpus(path, what)
    if seq_len < 2 or nsamples < 1 or (max_eval_windows is not None and max_eval_windows < 1) or new_tokens < 1:
        raise ValueError("seq_len must be >= 2 and nsamples, eval windows and new_tokens >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    check_out(out, overwrite, allow=is_pipeline_out)
    n_ft = finetune_nsamples(finetune_cfg, nsamples, ft_nsamples)
    run = {"base_model": model_identity(model_dir), "train": fingerprint(train), "seq_len": seq_len,
           "nsamples": nsamples, "calibration": asdict(calib)}
    ft_run = dict(run, ft_nsamples=n_ft)
    if not overwrite:
        for ck in (out / "calibrated", out / "calibrated.partial"):
            if has_checkpoint(ck):
                check_same_run(ck, read_meta(ck).get("run"), run)
        for strategy in strategies:
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
    calibrated = out / "calibrated"
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
        summary["ppl_calibrated"] = evaluate(student, val, device, amp, weights=fingerprint(calibrated / "model.safetensors"))
    if prompts:
        texts["calibrated"] = continuations(student, tokenizer, prompts, new_tokens, device)
    summary["runs"] = {}
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
        rep["ppl"] = evaluate(s, val, device, amp, weights=fingerprint(out / strategy / "model.safetensors"))
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


def model_identity(model) -> dict:
    """What a resumed run must share with the run that wrote its checkpoint: the model's path, and the
    size and modification time of every file it is read from."""
    folder, gguf_file = model_source(model)
    files = [folder / gguf_file] if gguf_file else sorted(f for f in folder.iterdir() if f.is_file())
    return {"path": str(Path(model).resolve()),
            "files": {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}}


def format_summary(summary: dict) -> str:
    lines = [f"model {summary['model']}, format {summary['format']} "
             f"({summary['bits']['bits_per_quantized_weight']:.3f} bits per quantized weight)",
             f"  original        ppl {summary['ppl_original']:8.3f}",
             f"  calibrated      ppl {summary['ppl_calibrated']:8.3f}   ({summary.get('calibration_seconds')} s)"]
    for name, r in summary.get("runs", {}).items():
        lines.append(f"  {name:15s} ppl {r['ppl']:8.3f}   ({r['steps']} steps, {describe_seconds(r)}, "
                     f"{r['codes_changed_total']} code changes)")
    return "\n".join(lines)
