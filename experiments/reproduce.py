"""Reproduce the published results on your own GPU (or the toy study on any CPU), one command each.

    python -m experiments.reproduce toy        --out OUT [--full]
    python -m experiments.reproduce main-table --model ../shared/models/ref-llama --model ../shared/models/ref-mistral \
                                               --corpus ../shared/corpus --out OUT [--p-warmup 0]
    python -m experiments.reproduce smollm2    --model SmolLM2-135M-Instruct.Q4_1.gguf --corpus ../shared/corpus --out OUT \
                                               [--p-warmup 0]
    python -m experiments.reproduce representations --model ../shared/models/ref-llama --corpus ../shared/corpus --out OUT \
                                                    [--seeds N] [--first-seed K] [--jobs N] [--cells N] [--recipe smollm2]
                                                    [--only FORMATS] [--micro-batch-size N] [--p-warmup N]
    python -m experiments.reproduce kernels    --out OUT [--model ../shared/models/ref-llama]
    python -m experiments.reproduce scale      --out OUT
    python -m experiments.reproduce multi-gpu  --model ../shared/models/ref-llama --corpus ../shared/corpus --out OUT --gpus 2

--corpus is a folder holding train.txt.xz and validation.txt.xz. Every step writes into OUT and is
resumable: rerun the same command after an interruption. Each part prints where its JSON and plots
went; compare them with experiments/results/ (the numbers the docs quote).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm import cli
from llm.strategies import BUILTIN


def run(*args: str) -> None:
    """A subprocess of this Python; stop on its failure."""
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def pipeline(model, corpus: Path, out: Path, fmt: str, strategies: str, extra: tuple = (), tag: str = "") -> Path:
    """One `pvtuning pipeline` at the format's preset; returns its summary.json."""
    folder = out / f"{Path(model).name.removesuffix('.gguf')}_{fmt}{tag}"
    code = cli.main(["pipeline", str(model), "--train", str(corpus / "train.txt.xz"),
                     "--validation", str(corpus / "validation.txt.xz"), "--out", str(folder),
                     "--format", fmt, "--strategies", strategies, *extra])
    if code:
        raise SystemExit(code)
    return folder / "summary.json"


def parallel_pipeline(model, corpus: Path, out: Path, fmt: str, strategies: str, extra: tuple, tag: str,
                      jobs: int, ft_extra: tuple = ()) -> Path:
    """`pipeline` with its strategies run as up to `jobs` processes at once, all from one calibration:
    `pvtuning calibrate` first, then one pipeline per strategy in a folder holding (hard links to) that
    calibrated checkpoint, which it resumes from; the summaries merged into one. On one GPU the processes
    share it (with CUDA MPS their kernels overlap). extra: flags of both commands; ft_extra: the
    pipelines' own. Returns the merged summary's path."""
    from experiments.representations import merge, read_summary
    from pvtheory.io import write_json

    stem = f"{Path(model).name.removesuffix('.gguf')}_{fmt}{tag}"
    data = ("--train", str(corpus / "train.txt.xz"))
    calibrated = out / f"{stem}_calibrated"
    run("-m", "llm.cli", "calibrate", str(model), *data, "--out", str(calibrated), "--format", fmt, *extra)
    procs, folders = [], []
    for s in strategies.split(","):
        folder = out / f"{stem}_{s}"
        if not (folder / "calibrated").exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder / ".calibrated", ignore_errors=True)  # an interrupted copy
            shutil.copytree(calibrated, folder / ".calibrated", copy_function=_link_or_copy)
            (folder / ".calibrated").rename(folder / "calibrated")  # whole or absent: a kill leaves no half copy
        while len([p for p in procs if p.poll() is None]) >= jobs:
            time.sleep(1)
        args = ["-m", "llm.cli", "pipeline", str(model), *data, "--validation", str(corpus / "validation.txt.xz"),
                "--out", str(folder), "--format", fmt, "--strategies", s, *extra, *ft_extra]
        print("+", " ".join(args), flush=True)
        procs.append(subprocess.Popen([sys.executable, *args]))
        folders.append(folder)
    failed = [f.name for f, p in zip(folders, procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"pipelines failed: {', '.join(failed)} (rerun to resume)")
    path = out / f"{stem}.json"
    write_json(path, merge([read_summary(f / "summary.json") for f in folders]))
    return path


def _link_or_copy(src, dst) -> None:
    """A hard link where the filesystem allows (checkpoint files are replaced, never written in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def plots(summaries: list, out: Path, name: str) -> None:
    from experiments.plots import plot_curves, plot_main_table

    loaded = [json.loads(p.read_text()) for p in summaries]
    plot_main_table(loaded, out / f"{name}.png")
    for path, s in zip(summaries, loaded):
        plot_curves(s, out / f"curves_{path.parent.name}.png")
    print(f"plots: {out}/{name}.png, {out}/curves_*.png")


def warmup_flags(a) -> tuple:
    """`--p-warmup N` for the pipelines where the command set it, else nothing (each format's tuned setting)."""
    return ("--p-warmup", str(a.p_warmup)) if a.p_warmup is not None else ()


def main_table(a) -> None:
    summaries = [pipeline(m, a.corpus, a.out, fmt, a.strategies, warmup_flags(a))
                 for m in a.model for fmt in a.formats.split(",")]
    plots(summaries, a.out, "main_table")


# SmolLM2-135M's recipe, sized so that one format's whole pipeline fits in 10 minutes on one H200
# (docs/results_smollm2.md); the calibration rounds per preset
SMOLLM2_CALIBRATION = ("--nsamples", "512", "--block-tune-steps", "100")
SMOLLM2_FINETUNE = ("--steps", "80", "--ft-batch-size", "64")
SMOLLM2_RECIPE = SMOLLM2_CALIBRATION + SMOLLM2_FINETUNE
SMOLLM2_ROUNDS = {"2x8g8": "4", "1x8g8": "12"}


def smollm2(a) -> None:
    common = SMOLLM2_RECIPE + ("--prompts", str(Path(__file__).with_name("prompts.txt"))) + warmup_flags(a)
    summaries = [pipeline(a.model[0], a.corpus, a.out, "2x8g8", "pv,ste,continuous",
                          common + ("--rounds", SMOLLM2_ROUNDS["2x8g8"], "--strategy-settings", '{"pv":{"p_lr":0.03}}')),
                 pipeline(a.model[0], a.corpus, a.out, "1x8g8", "pv,ste,continuous",
                          common + ("--rounds", SMOLLM2_ROUNDS["1x8g8"]))]
    plots(summaries, a.out, "smollm2")


def representations(a) -> None:
    from experiments.representations import WIDTHS, choose_formats, layer_shapes, markdown, read_summary, table
    from pvtheory.io import write_json

    for model in a.model:
        cells = []  # (format, pipeline flags, tag): one calibration each
        for width, reps in choose_formats(layer_shapes(model)).items():
            preset = WIDTHS[width][1]
            for fmt, _ in reps.values():
                recipe = SMOLLM2_CALIBRATION + ("--rounds", SMOLLM2_ROUNDS[preset]) if a.recipe == "smollm2" else ()
                for seed in range(a.first_seed, a.first_seed + a.seeds):  # one calibration per seed; the table pools them
                    cells.append((fmt, ("--preset", preset, "--seed", str(seed), *recipe), f"_seed{seed}" if seed else ""))

        if a.only:
            only = set(a.only.split(","))
            unknown = only - {fmt for fmt, _, _ in cells}
            if unknown:
                raise SystemExit(f"--only: {', '.join(sorted(unknown))} is not a format of this model's table "
                                 f"({', '.join(dict.fromkeys(fmt for fmt, _, _ in cells))})")
            cells = [c for c in cells if c[0] in only]
        ft = SMOLLM2_FINETUNE if a.recipe == "smollm2" else ()  # pipeline flags only, never `pvtuning calibrate`'s
        ft += ("--micro-batch-size", str(a.micro_batch_size)) if a.micro_batch_size else ()
        ft += warmup_flags(a)

        def cell(c: tuple) -> Path:
            fmt, extra, tag = c
            if a.jobs > 1 or a.cells > 1:  # processes of their own: cells may run side by side
                return parallel_pipeline(model, a.corpus, a.out, fmt, a.strategies, extra, tag, a.jobs, ft)
            return pipeline(model, a.corpus, a.out, fmt, a.strategies, extra + ft, tag=tag)

        with ThreadPoolExecutor(max_workers=a.cells) as pool:  # each worker waits on its cell's processes
            summaries = list(pool.map(cell, cells))
        result = table([read_summary(p) for p in summaries])
        name = Path(model).name.removesuffix(".gguf")
        write_json(a.out / f"representations_{name}.json", result)
        print(markdown(result))
        print(f"table: {a.out}/representations_{name}.json")


def kernels(a) -> None:
    # AQLM's kernels join the comparison where `aqlm` (1.1.7) is installed
    run("-m", "experiments.bench_kernels", "--device", "cuda", "--shapes", "7b", "--tokens", "1,4,16",
        "--out", str(a.out / "gpu_matvec.json"))
    run("-m", "experiments.bench_kernels", "--device", "cuda", "--shapes", "smollm2", "--tokens", "1,8",
        "--out", str(a.out / "gpu_matvec_smollm2.json"))
    run("-m", "experiments.bench_kernels", "--device", "cuda", "--grouped", "--shapes", "7b", "--formats", "2x8g8,1x8g8",
        "--tokens", "1,4,16", "--out", str(a.out / "gpu_matvec_one_launch_shared_input.json"))
    run("-m", "experiments.bench_kernels", "--device", "cuda", "--grouped", "--shapes", "smollm2",
        "--formats", "2x8g8,1x8g8,1x16g8", "--tokens", "1,4", "--out", str(a.out / "gpu_matvec_one_launch_smollm2.json"))
    models = [arg for m in a.model for arg in ("--model", str(m))]  # optional: real models beside the shapes
    run("-m", "experiments.bench_decode", "--seven-b", "--smollm2", *models, "--batch", "1,8", "--new-tokens", "64",
        "--reference-tokens", "16", "--device", "cuda", "--out", str(a.out / "gpu_decode.json"))
    # compiled, and with the layers that read one input in one launch (the unfused compiled rows too)
    run("-m", "experiments.bench_decode", "--seven-b", "--smollm2", "--formats", "2x8g8,1x8g8", "--compile", "--fuse",
        "--new-tokens", "64", "--reference-tokens", "8", "--device", "cuda", "--out", str(a.out / "gpu_decode_fused.json"))
    run("-m", "experiments.bench_decode", "--seven-b", "--smollm2", "--formats", "2x8g8,1x8g8", "--compile", "--fuse",
        "--batch", "8", "--new-tokens", "64", "--reference-tokens", "8", "--device", "cuda",
        "--out", str(a.out / "gpu_decode_fused_batch8.json"))


def scale(a) -> None:
    run("-m", "experiments.bench_scale", "--out", str(a.out / "finetune_step_7b.json"), "--skip", "calibration")
    run("-m", "experiments.bench_scale", "--out", str(a.out / "calibration_7b_block_12rounds.json"), "--skip",
        "finetune", "--nsamples", "16", "--rounds", "12", "--block-tune-steps", "300")


def multi_gpu(a) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ck = a.out / "ck-2x8g8"
    if cli.main(["calibrate", str(a.model[0]), "--train", str(a.corpus / "train.txt.xz"), "--out", str(ck),
                 "--format", "2x8g8", "--rounds", "4", "--block-tune-steps", "300"]):
        raise SystemExit(2)
    name = Path(a.model[0]).name
    for n in sorted({1, a.gpus}):
        run("-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "experiments.dist_finetune",
            "--out", str(a.out / f"{name}_2x8g8_world{n}.json"), "--checkpoint", str(ck), "--model", str(a.model[0]),
            "--train", str(a.corpus / "train.txt.xz"), "--steps", "100", "--batch-size", "32")
        run("-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "experiments.dist_finetune",
            "--out", str(a.out / f"llama2-7b-shape_world{n}.json"), "--random", "7b", "--steps", "4", "--batch-size", "2")
    for blocks in (8, 16):  # one GPU: the 70B shape's memory per block, from two cuts of it
        run("-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "experiments.dist_finetune",
            "--out", str(a.out / f"llama2-70b-shape_{blocks}blocks_world1.json"), "--random", "70b",
            "--layers", str(blocks), "--steps", "3", "--batch-size", "1")
    if a.gpus >= 4:  # a model no single GPU can hold: the Llama-2-70B shape, one 4096-token sequence per GPU
        run("-m", "torch.distributed.run", "--nproc-per-node", str(a.gpus), "-m", "experiments.dist_finetune",
            "--out", str(a.out / f"llama2-70b-shape_world{a.gpus}.json"), "--random", "70b", "--steps", "3",
            "--batch-size", str(a.gpus))


def toy(a) -> None:
    run("-m", "experiments.toy_study", "--out", str(a.out), *(["--full"] if a.full else []))


PARTS = {"toy": toy, "main-table": main_table, "smollm2": smollm2, "representations": representations,
         "kernels": kernels, "scale": scale, "multi-gpu": multi_gpu}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS, help="which results to reproduce")
    ap.add_argument("--out", type=Path, required=True, help="folder for every output (created)")
    ap.add_argument("--model", action="append", default=[], help="model directory or GGUF file (repeatable)")
    ap.add_argument("--corpus", type=Path, help="folder holding train.txt.xz and validation.txt.xz")
    ap.add_argument("--formats", default="2x8g8,1x8g8", help="main-table: formats, comma-separated")
    ap.add_argument("--strategies", default=",".join(sorted(BUILTIN, key=lambda s: s != "pv")),
                    help="main-table, representations: strategies, comma-separated, run in this order (default: "
                         "PV-Tuning first, so that a run cut short still has it beside what finished)")
    ap.add_argument("--gpus", type=cli.POSITIVE_INT, default=2, help="multi-gpu: processes to compare with one")
    ap.add_argument("--full", action="store_true", help="toy: every seed (minutes), not the quick demo")
    ap.add_argument("--seeds", type=cli.POSITIVE_INT, default=1,
                    help="representations: calibrations per cell, seeds --first-seed .. --first-seed + n - 1")
    ap.add_argument("--first-seed", type=cli.NONNEG_INT, default=0,
                    help="representations: the first cell seed (more seeds for a table already run: its tables pool)")
    ap.add_argument("--recipe", choices=["presets", "smollm2"], default="presets",
                    help="representations: each width's preset as it is, or with SmolLM2-135M's shorter recipe "
                         "(the smollm2 part's calibration and fine-tuning budget)")
    ap.add_argument("--jobs", type=cli.POSITIVE_INT, default=1,
                    help="representations: a cell's strategies as this many processes at once, from one calibration")
    ap.add_argument("--cells", type=cli.POSITIVE_INT, default=1,
                    help="representations: this many cells (calibrations) at once, each with its --jobs processes")
    ap.add_argument("--only", help="representations: only the cells of these formats, comma-separated")
    ap.add_argument("--micro-batch-size", type=cli.POSITIVE_INT,
                    help="representations: fine-tuning micro-batches of this many sequences (the same global batch "
                         "with less memory per process, so that more processes share one GPU)")
    ap.add_argument("--p-warmup", type=cli.NONNEG_INT,
                    help="main-table, smollm2, representations: steps every fine-tuning's P step only gathers its "
                         "moments (default: the tuned setting of each format and strategy; 0 gives the published "
                         "main-table and smollm2 runs' setting)")
    a = ap.parse_args(argv)
    needs = {"main-table": ("model", "corpus"), "smollm2": ("model", "corpus"), "multi-gpu": ("model", "corpus"),
             "representations": ("model", "corpus")}
    missing = [f"--{n}" for n in needs.get(a.part, ()) if not getattr(a, n)]
    if missing:
        ap.error(f"{a.part} needs {' and '.join(missing)}")
    a.out.mkdir(parents=True, exist_ok=True)
    PARTS[a.part](a)


if __name__ == "__main__":
    main()
