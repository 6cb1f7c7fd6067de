"""The README's headline figures are the values in the result files they cite."""
import json

import pytest

from experiments.summary import main


def test_every_headline_figure_matches_its_result_file():
    assert main(["--check"]) == 0


def test_plots_of_the_main_table_and_training_curves_are_written(tmp_path):
    from pathlib import Path

    from experiments.plots import plot_curves, plot_main_table

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results" / "main_table"
    summaries = [s for s in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))) if "runs" in s]
    plot_main_table(summaries, tmp_path / "table.png")
    plot_curves(summaries[0], tmp_path / "curves.png")
    assert (tmp_path / "table.png").stat().st_size > 10_000 and (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_representations_plot_is_written_from_the_committed_tables(tmp_path):
    from pathlib import Path

    from experiments.plots import main as plots

    tables = sorted((Path(__file__).resolve().parents[1] / "experiments" / "results" / "representations").glob("table_*.json"))
    plots(["representations", *map(str, tables), "--out", str(tmp_path / "r.png")])
    assert len(tables) >= 2 and (tmp_path / "r.png").stat().st_size > 10_000


def test_reproduce_names_what_a_part_needs(capsys):
    import pytest

    from experiments.reproduce import main as reproduce

    with pytest.raises(SystemExit) as e:
        reproduce(["main-table", "--out", "unused"])
    assert e.value.code == 2 and "main-table needs --model and --corpus" in capsys.readouterr().err


def test_reproduce_representations_runs_one_calibration_per_seed_from_the_first_and_pools_them(tmp_path, monkeypatch):
    from experiments import reproduce

    calls = []

    def fake_pipeline(model, corpus, out, fmt, strategies, extra=(), tag=""):
        seed = int(extra[extra.index("--seed") + 1])
        calls.append((fmt, seed, tag))
        return _written(out / f"{fmt}{tag}.json", _summary(fmt, 20.0 + seed, pv=10.0 + seed, ste=11.0))

    monkeypatch.setattr(reproduce, "pipeline", fake_pipeline)
    monkeypatch.setattr("experiments.representations.layer_shapes", lambda model: REF_LLAMA_SHAPES)
    reproduce.main(["representations", "--model", "ref-llama", "--corpus", "c", "--out", str(tmp_path), "--seeds", "2"])
    assert len(calls) == 12 and {(s, t) for _, s, t in calls} == {(0, ""), (1, "_seed1")}
    table = json.loads((tmp_path / "representations_ref-llama.json").read_text())
    assert table["about 2 bits"]["scalar"]["rows"]["pv"]["runs"] == [10.0, 11.0]

    calls.clear()
    reproduce.main(["representations", "--model", "ref-llama", "--corpus", "c", "--out", str(tmp_path / "more"),
                    "--first-seed", "2"])
    assert len(calls) == 6 and {(s, t) for _, s, t in calls} == {(2, "_seed2")}


def _representations_flags(monkeypatch, tmp_path, *args: str) -> dict:
    """`reproduce representations ARGS` with a fake pipeline per cell: {format: the flags its pipeline got}."""
    from experiments import reproduce

    flags = {}

    def fake_pipeline(model, corpus, out, fmt, strategies, extra=(), tag=""):
        flags[fmt] = extra
        return _written(out / f"{fmt}.json", _summary(fmt, 20.0, pv=10.0, ste=11.0))

    monkeypatch.setattr(reproduce, "pipeline", fake_pipeline)
    monkeypatch.setattr("experiments.representations.layer_shapes", lambda model: REF_LLAMA_SHAPES)
    reproduce.main(["representations", "--model", "m.gguf", "--corpus", "c", "--out", str(tmp_path), *args])
    return flags


def test_reproduce_representations_with_the_smollm2_recipe_gives_each_preset_its_rounds(tmp_path, monkeypatch):
    flags = _representations_flags(monkeypatch, tmp_path, "--recipe", "smollm2")
    rounds = {fmt: (e[e.index("--preset") + 1], e[e.index("--rounds") + 1]) for fmt, e in flags.items()}
    assert rounds["2x8g8"] == ("2x8g8", "4") and rounds["int1g64"] == ("1x8g8", "12")
    assert all(e[e.index("--steps") + 1] == "80" for e in flags.values())


def test_reproduce_representations_runs_only_the_named_cells_with_the_given_micro_batches(tmp_path, monkeypatch):
    flags = _representations_flags(monkeypatch, tmp_path, "--micro-batch-size", "8", "--only", "vq8g4,2x6g8")
    assert set(flags) == {"vq8g4", "2x6g8"}
    assert all(e[e.index("--micro-batch-size") + 1] == "8" for e in flags.values())
    with pytest.raises(SystemExit) as e:
        _representations_flags(monkeypatch, tmp_path, "--only", "vq8g4,int3g8")
    assert "int3g8 is not a format of this model's table" in str(e.value.code)


def test_reproduce_representations_passes_an_explicit_p_warmup_to_every_fine_tuning_only(tmp_path, monkeypatch):
    assert not any("--p-warmup" in e for e in _representations_flags(monkeypatch, tmp_path).values())
    flags = _representations_flags(monkeypatch, tmp_path, "--p-warmup", "0", "--only", "2x8g8")
    assert flags["2x8g8"][flags["2x8g8"].index("--p-warmup") + 1] == "0"


def test_reproduce_representations_runs_pv_first_and_gives_pvtuning_calibrate_only_flags_it_takes(tmp_path, monkeypatch):
    from experiments import reproduce
    from llm.cli import build_parser

    seen = {}

    def fake_parallel(model, corpus, out, fmt, strategies, extra, tag, jobs, ft_extra=()):
        assert strategies.split(",")[0] == "pv"  # PV-Tuning first: a run cut short still has it
        seen[fmt] = (extra, ft_extra)
        return _written(out / f"{fmt}.json", _summary(fmt, 20.0, pv=10.0, ste=11.0))

    monkeypatch.setattr(reproduce, "parallel_pipeline", fake_parallel)
    monkeypatch.setattr("experiments.representations.layer_shapes", lambda model: REF_LLAMA_SHAPES)
    reproduce.main(["representations", "--model", "m.gguf", "--corpus", "c", "--out", str(tmp_path), "--recipe", "smollm2",
                    "--jobs", "2", "--micro-batch-size", "8"])
    for fmt, (extra, ft) in seen.items():  # parallel_pipeline calibrates with `extra`, fine-tunes with both
        build_parser().parse_args(["calibrate", "m", "--train", "t", "--out", "o", "--format", fmt, *extra])
        build_parser().parse_args(["pipeline", "m", "--train", "t", "--validation", "v", "--out", "o", "--format", fmt,
                                   *extra, *ft])
        assert ft[ft.index("--steps") + 1] == "80" and ft[ft.index("--micro-batch-size") + 1] == "8"


def test_parallel_pipeline_runs_each_strategy_from_one_calibration_and_merges_them(tmp_path):
    import lzma

    from llm_helpers import tiny_corpus, tiny_model_dir

    from experiments.reproduce import parallel_pipeline

    model = tiny_model_dir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for src, name in zip(tiny_corpus(tmp_path), ("train.txt.xz", "validation.txt.xz")):
        with lzma.open(corpus / name, "wt") as f:
            f.write(src.read_text())
    small = ("--preset", "default", "--seed", "2", "--nsamples", "8", "--seq-len", "32", "--rounds", "1",
             "--block-tune-steps", "2", "--device", "cpu")
    path = parallel_pipeline(model, corpus, tmp_path / "out", "1x6g8", "continuous,pv", small, "", 2,
                             ("--steps", "2", "--ft-batch-size", "4", "--eval-windows", "4"))
    merged = json.loads(path.read_text())
    assert {r["strategy"] for r in merged["runs"].values()} == {"continuous", "pv"} and merged["calibration"]["seed"] == 2
    calibrated = tmp_path / "out" / f"{model.name}_1x6g8_calibrated" / "model.safetensors"
    for s in ("continuous", "pv"):  # each pipeline resumed from the one calibration (a link to it), none calibrated again
        assert (tmp_path / "out" / f"{model.name}_1x6g8_{s}" / "calibrated" / "model.safetensors").samefile(calibrated)


def test_each_representation_gets_the_format_of_nearest_bits_whose_groups_divide_the_layers():
    from experiments.representations import choose_formats

    ref_llama = [(384, 384)] * 4 + [(1024, 384)] * 2 + [(384, 1024)]
    smollm2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    got = {w: {r: f for r, (f, _) in reps.items()} for w, reps in choose_formats(ref_llama).items()}
    assert got["about 2 bits"] == {"scalar": "int2g128", "vector": "vq8g4", "additive": "2x8g8"}
    assert got["about 1.5 bits"] == {"scalar": "int1g64", "vector": "vq9g8", "additive": "2x6g8"}
    assert choose_formats(smollm2)["about 2 bits"]["scalar"][0] == "int2g192"  # 128 does not divide 576


def test_the_representations_table_has_a_row_per_strategy_and_a_column_per_format():
    from pathlib import Path

    from experiments.representations import count, markdown, table

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results"
    summaries = [json.loads((folder / f).read_text()) for f in
                 ("representations/ref-llama_int2g128.json", "representations/ref-llama_vq8g4.json")]
    t = table(summaries)
    assert set(t["about 2 bits"]) == {"scalar", "vector"}
    assert t["about 2 bits"]["vector"]["rows"]["pv"]["runs"] == [summaries[1]["runs"]["pv"]["ppl"]]
    lines = markdown(t).splitlines()
    assert len(lines) == 2 + 6 + 2 and "int2g128" in lines[0] and "vq8g4" in lines[0] and "same calibration" in lines[-2]
    pv, ste = (summaries[1]["runs"][k]["codes_changed_total"] for k in ("pv", "ste"))
    assert lines[-1].startswith("| codes changed by PV / STE") and f"{count(pv)} / {count(ste)}" in lines[-1]
    assert [count(n) for n in (3_117_181, 21_652, 351)] == ["3.12M", "21.7k", "351"]


REF_LLAMA_SHAPES = [(384, 384)] * 4 + [(1024, 384)] * 2 + [(384, 1024)]  # a block's linears (out, in)


def _written(path, obj: dict):
    path.write_text(json.dumps(obj))
    return path


def _summary(fmt: str, calibrated: float, **ppl) -> dict:
    return {"model": "m", "format": fmt, "calibration": {"seed": 0}, "ppl_calibrated": calibrated, "ppl_original": 10.0,
            "eval_windows": 5, "ft_nsamples": 8, "bits": {"bits_per_quantized_weight": 1.5},
            "runs": {k: {"ppl": v, "codes_changed_total": 1} for k, v in ppl.items()},
            "strategy_settings": {k: {"p_lr": 0.1} for k in ppl}}


def test_merge_joins_the_strategies_of_one_calibration_and_refuses_two_calibrations():
    from experiments.representations import merge

    m = merge([_summary("int1g64", 40.0, pv=12.0), _summary("int1g64", 40.0, ste=13.0, continuous=14.0)])
    assert {k: r["ppl"] for k, r in m["runs"].items()} == {"pv": 12.0, "ste": 13.0, "continuous": 14.0}
    assert set(m["strategy_settings"]) == {"pv", "ste", "continuous"}
    with pytest.raises(ValueError, match="different calibrations"):
        merge([_summary("int1g64", 40.0, pv=12.0), _summary("int1g64", 41.0, ste=13.0)])
    with pytest.raises(ValueError, match="two of the summaries"):
        merge([_summary("int1g64", 40.0, pv=12.0), _summary("int1g64", 40.0, pv=12.5)])


def test_merge_and_table_refuse_a_file_that_is_not_a_summary_in_one_line(tmp_path, capsys):
    from experiments.representations import main

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_summary("int1g64", 40.0, pv=12.0)))
    bad.write_text(json.dumps({"figures": []}))
    for cmd in (["merge", str(good), str(bad), "--out", str(tmp_path / "m.json")], ["table", str(good), str(tmp_path / "none.json")]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "m.json").exists()


def test_a_cell_pools_its_calibrations_and_pairs_pv_with_the_best_other_on_each():
    from experiments.representations import markdown, table

    runs = [_summary("int1g64", 40.0, pv=11.0, ste=12.0, continuous=14.0), _summary("int1g64", 42.0, pv=12.5, ste=12.0),
            _summary("int1g64", 41.0, continuous=13.5)]
    cell = table(runs)["about 1.5 bits"]["scalar"]
    assert cell["rows"]["ste"] == {"mean": 12.0, "min": 12.0, "max": 12.0, "runs": [12.0, 12.0]}
    assert cell["rows"]["continuous"]["runs"] == [14.0, 13.5] and cell["rows"]["calibrated"]["mean"] == 41.0
    assert cell["pv_vs_best_other"]["strategy"] == "ste"
    assert cell["pv_vs_best_other"]["percent"] == [round(100 * (11 / 12 - 1), 2), round(100 * (12.5 / 12 - 1), 2)]
    text = markdown(table(runs))
    assert "**11.75** (11.00-12.50, 2)" in text and "12.00 (12.00-12.00, 2)" in text and "-2.1% vs ste (-8.3 to +4.2, 2)" in text


def test_a_strategy_never_run_on_pvs_calibrations_is_compared_through_continuous(tmp_path):
    from experiments.plots import plot_representations
    from experiments.representations import markdown, table

    runs = [_summary("int1g64", 40.0, pv=11.0, continuous=10.0), _summary("int1g64", 42.0, ste=9.0, continuous=10.0)]
    t = table(runs)
    cell = t["about 1.5 bits"]["scalar"]
    assert cell["pv_vs_best_other"] == {"strategy": "continuous", "percent": [10.0]}  # same calibration only
    assert cell["vs_pv"] == {"continuous": [-9.09]} and cell["vs_continuous"] == {"pv": [10.0], "ste": [-10.0]}
    assert "+10.0% vs continuous; not on PV's calibrations, each vs continuous on its own: PV +10.0%, ste -10.0%" \
        in markdown(t)
    plot_representations({"m": t}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_the_plot_measures_each_strategy_against_continuous_on_its_own_calibrations_else_through_the_means():
    from experiments.plots import vs_continuous
    from experiments.representations import table

    runs = [_summary("int1g64", 40.0, pv=11.0, continuous=10.0), _summary("int1g64", 42.0, ste=9.0, continuous=12.0),
            _summary("int1g64", 41.0, stochastic=13.2)]
    bars = vs_continuous(table(runs)["about 1.5 bits"]["scalar"])
    assert bars["pv"] == ([10.0], False) and bars["ste"] == ([-25.0], False)
    assert bars["stochastic"][1] and abs(bars["stochastic"][0][0] - 20.0) < 1e-9  # 13.2 against the mean 11.0
    assert set(bars) == {"pv", "ste", "stochastic"}


def test_a_benchmark_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """bench_decode and bench_kernels save after every row (marked partial), so a run stopped by a time limit
    loses only the row it was on."""
    from experiments import bench_decode, bench_kernels

    def variant(name, build, fmt, prompt, graph_modes, args, dtype):
        if fmt != "none":
            raise KeyboardInterrupt  # what a time limit's signal does to the run
        return {"model": name, "format": fmt, "batch": prompt.shape[0], "eager": {"ms_per_token": 1.0, "tokens_per_s": 1.0}}

    monkeypatch.setattr(bench_decode, "bench_variant", variant)
    out = tmp_path / "decode.json"
    with pytest.raises(KeyboardInterrupt):
        bench_decode.main(["--model", str(tmp_path), "--device", "cpu", "--formats", "2x8g8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["partial"] and [r["format"] for r in saved["runs"]] == ["none"]

    calls = []

    def case(fmt, n_in, n_out, tokens, gen, reps, stop_after=1):
        calls.append(fmt)
        if len(calls) > stop_after:
            raise KeyboardInterrupt
        return {"format": fmt, "lut_ms": 1.0, "dense_float32_ms": 1.0, "dense_bf16_ms": 1.0, "dequantize_then_matmul_ms": 1.0}

    monkeypatch.setattr(bench_kernels, "bench_cpu_case", case)
    out = tmp_path / "matvec.json"
    args = ["--device", "cpu", "--shapes", "ref", "--formats", "2x8g8", "--tokens", "1,4", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(args)
    saved = json.loads(out.read_text())
    assert saved["meta"]["partial"] and len(saved["cases"]) == 1
    calls.clear()
    monkeypatch.setattr(bench_kernels, "bench_cpu_case", lambda *a: case(*a, stop_after=10**6))
    bench_kernels.main(args)
    saved = json.loads(out.read_text())
    assert "partial" not in saved["meta"] and len(saved["cases"]) == len(calls) > 1


def test_reproduce_representations_runs_several_cells_at_once_and_keeps_their_order(tmp_path, monkeypatch):
    import threading

    from experiments import reproduce

    started = []
    together = threading.Barrier(3, timeout=30)  # the first three cells must be running at the same time

    def fake_parallel(model, corpus, out, fmt, strategies, extra, tag, jobs, ft_extra=()):
        started.append(fmt)
        if len(started) <= 3:
            together.wait()
        return _written(out / f"{fmt}.json", _summary(fmt, 20.0, pv=10.0, ste=11.0))

    monkeypatch.setattr(reproduce, "parallel_pipeline", fake_parallel)
    monkeypatch.setattr("experiments.representations.layer_shapes", lambda model: REF_LLAMA_SHAPES)
    reproduce.main(["representations", "--model", "ref-llama", "--corpus", "c", "--out", str(tmp_path), "--cells", "3"])
    assert len(started) == 6
    table = json.loads((tmp_path / "representations_ref-llama.json").read_text())
    assert [c["format"] for w in table.values() for c in w.values()] == ["int2g128", "vq8g4", "2x8g8", "int1g64", "vq9g8", "2x6g8"]
    with pytest.raises(SystemExit):
        reproduce.main(["representations", "--model", "m", "--corpus", "c", "--out", str(tmp_path), "--cells", "0"])


def _with_p_warmup(summary: dict, steps: int = 5) -> dict:
    summary["runs"]["pv"]["config"] = {"strategy": "pv", "p_warmup": steps}
    return summary


def test_pv_with_a_p_warmup_is_a_row_of_its_own_merged_beside_pv_and_paired_on_its_calibrations(tmp_path):
    from experiments.plots import plot_representations
    from experiments.representations import markdown, merge, table

    seed0 = merge([_summary("vq9g8", 40.0, pv=12.0, ste=11.0, continuous=11.5), _with_p_warmup(_summary("vq9g8", 40.0, pv=10.5))])
    assert set(seed0["runs"]) == {"pv", "pv_warmup", "ste", "continuous"} and "pv_warmup" in seed0["strategy_settings"]
    seed1 = _with_p_warmup(_summary("vq9g8", 41.0, pv=10.0, continuous=10.8))
    seed2 = _with_p_warmup(_summary("vq9g8", 42.0, pv=9.0), steps=0)  # --p-warmup 0: plain PV-Tuning
    t = table([seed0, seed1, seed2])
    cell = t["about 1.5 bits"]["vector"]
    assert cell["rows"]["pv"]["runs"] == [12.0, 9.0] and cell["rows"]["pv_warmup"]["runs"] == [10.5, 10.0]
    assert cell["pv_vs_best_other"] == {"strategy": "ste", "percent": [round(100 * (12 / 11 - 1), 2)]}
    # on the warm-up's own calibrations, never plain PV-Tuning (which ran on seed 0 at +14.3% against it)
    assert cell["pv_warmup_vs_best_other"] == {"strategy": "ste", "percent": [round(100 * (10.5 / 11 - 1), 2)]}
    assert cell["vs_pv_warmup"]["continuous"] == [round(100 * (11.5 / 10.5 - 1), 2), round(100 * (10.8 / 10 - 1), 2)]
    assert cell["vs_pv"]["pv_warmup"] == [round(100 * (10.5 / 12 - 1), 2)]
    text = markdown(t)
    assert "| pv_warmup |" in text and "| PV-Tuning with the P warm-up vs the best other, same calibration | -4.5% vs ste" in text
    plot_representations({"m": t}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(ValueError, match="'pv_warmup' is in two"):
        merge([_with_p_warmup(_summary("vq9g8", 40.0, pv=10.5)), _with_p_warmup(_summary("vq9g8", 40.0, pv=10.4))])


def test_the_kernel_time_model_is_refitted_from_the_committed_measurements(tmp_path):
    from pathlib import Path

    from experiments.kernel_time_model import main as fit_kernel_times

    fit_kernel_times(["--out", str(tmp_path / "fit.json")])
    committed = Path(__file__).resolve().parents[1] / "experiments" / "results" / "kernels" / "time_model_one_token.json"
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit == json.loads(committed.read_text())
    for r in fit["formats"].values():  # the model explains every call it was fitted on
        assert all(abs(c["fitted_us"] - c["measured_us"]) < 0.5 for c in r["calls"])

