"""The console script: the whole pipeline on a tiny model, and one-line errors for bad input."""
import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from llm.cli import main
from llm_helpers import tiny_corpus, tiny_model_dir


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.cli", *map(str, args)], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("pvtuning: error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr


def test_pipeline_runs_end_to_end_and_resumes_without_evaluating_anything_twice(tmp_path, capsys, monkeypatch):
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    args = ["pipeline", model, "--train", train, "--validation", val, "--out", tmp_path / "run", "--format", "1x6g8",
            "--strategies", "continuous,pv", "--steps", "3", "--nsamples", "8", "--seq-len", "32", "--rounds", "1", "--block-tune-steps", "2",
            "--ft-batch-size", "4", "--eval-windows", "4", "--device", "cpu"]
    assert main(list(map(str, args))) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["runs"]) == {"continuous", "pv"} and summary["ppl_calibrated"] > 1
    monkeypatch.setattr("llm.pipeline.perplexity", lambda *a, **k: pytest.fail("evaluated the same weights again"))
    assert main(list(map(str, args))) == 0  # everything is checkpointed: a rerun resumes and finishes
    rerun = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [rerun[k] for k in ("ppl_original", "ppl_calibrated")] == [summary[k] for k in ("ppl_original", "ppl_calibrated")]
    assert {k: r["ppl"] for k, r in rerun["runs"].items()} == {k: r["ppl"] for k, r in summary["runs"].items()}
    for name, run in summary["runs"].items():  # ... and keeps the time its steps took in the first run
        assert run["seconds"] <= rerun["runs"][name]["seconds"] < run["seconds"] + 1.0
        assert rerun["runs"][name]["seconds_per_step"] == pytest.approx(rerun["runs"][name]["seconds"] / 3, abs=1e-3)
    assert main(["export", str(tmp_path / "run" / "pv"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run" / "pv"), "--prompt", "the model", "--new-tokens", "6", "--device", "cpu",
                 "--no-fuse"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and json.loads(out.err.strip().splitlines()[-1])["tokens_per_s"] > 0
    assert main(["generate", str(tmp_path / "run" / "pv"), "--prompt", "the model", "--new-tokens", "6", "--device", "cpu"]) == 0
    fused = capsys.readouterr()  # q, k, v and gate, up of both blocks share launches on the GPU; on the CPU each runs alone
    assert fused.out == out.out and json.loads(fused.err.strip().splitlines()[-1])["fused_launches"] == 4


def test_missing_model_directory(tmp_path):
    assert_one_line_error(run_cli("calibrate", tmp_path / "nope", "--train", tmp_path / "t.txt", "--out", tmp_path / "o"),
                          "model not found")


def test_malformed_model_directory(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("calibrate", d, "--train", tmp_path / "t.txt", "--out", tmp_path / "o"),
                          "is not valid JSON")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(run_cli("calibrate", d, "--train", tmp_path / "t.txt", "--out", tmp_path / "o"),
                          "unsupported architecture 'gpt2'")


def test_format_whose_group_does_not_divide_the_layer(tmp_path):
    model = tiny_model_dir(tmp_path)
    train, _ = tiny_corpus(tmp_path)
    proc = run_cli("calibrate", model, "--train", train, "--out", tmp_path / "o", "--format", "1x8g7",
                   "--nsamples", "2", "--seq-len", "16", "--device", "cpu")
    assert_one_line_error(proc, "group size 7 does not divide")
    assert not (tmp_path / "o").exists()


def test_pipeline_with_a_format_that_does_not_divide_a_layer_fails_before_reading_the_data(tmp_path, monkeypatch):
    from llm import pipeline

    model = tiny_model_dir(tmp_path)
    train, valid = tiny_corpus(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the corpus was read before the format was checked")

    monkeypatch.setattr(pipeline, "train_tokens", no_work)
    monkeypatch.setattr(pipeline, "validation_windows", no_work)
    with pytest.raises(ValueError, match="group size 7 does not divide model.layers.0.self_attn.q_proj"):
        pipeline.run_pipeline(model, train, valid, tmp_path / "o", pipeline.CalibrationConfig(fmt="1x8g7"),
                              pipeline.FinetuneConfig(steps=1), device="cpu")
    assert not (tmp_path / "o").exists()


def test_bad_format_string(tmp_path):
    model = tiny_model_dir(tmp_path)
    assert_one_line_error(run_cli("calibrate", model, "--train", "x", "--out", tmp_path / "o", "--format", "2bits"),
                          "unknown quantization format")


def test_generate_with_an_empty_prompt(tmp_path):
    model = tiny_model_dir(tmp_path)
    assert_one_line_error(run_cli("generate", model, "--prompt", "", "--device", "cpu"), "prompt is empty")


def test_every_cli_option_has_a_help_line():
    import argparse

    from llm.cli import build_parser

    subparsers = build_parser()._subparsers._group_actions[0].choices
    missing = [(name, a.dest) for name, sp in subparsers.items() for a in sp._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing


def _settings(a, strategy: str = "pv"):
    """The settings a parsed command line gives `strategy`."""
    from llm.cli import _ft_cfg, strategy_overrides
    from llm.pipeline import strategy_config

    return strategy_config(_ft_cfg(a, strategy), strategy, a.format, strategy_overrides(a, [strategy])[strategy]).settings


def _pipeline_args(fmt: str, *flags):
    from llm.cli import build_parser

    return build_parser().parse_args(["pipeline", "m", "--train", "t", "--validation", "v", "--out", "o", "--format", fmt,
                                      *flags])


@pytest.mark.parametrize("fmt,steps,batch,block_steps,pv_p_lr", [("2x8g8", 260, 128, 500, 0.03), ("1x8g8", 220, 64, 1000, 0.1),
                                                                   ("3x8g8", 200, 64, 1000, 0.01), ("int2g128", 200, 64, 1000, 1e-3)])
def test_pipeline_without_flags_runs_the_formats_best_recipe(fmt, steps, batch, block_steps, pv_p_lr):
    from llm.cli import _calib_cfg, _ft_cfg

    a = _pipeline_args(fmt)
    ft, cal = _ft_cfg(a, "pv"), _calib_cfg(a)
    assert (ft.steps, ft.batch_size, ft.v_optimizer, ft.lr, cal.block_tune_steps) == (steps, batch, "lamb", 1e-3, block_steps)
    assert _settings(a).p_lr == pv_p_lr


@pytest.mark.parametrize("fmt,rounds,steps,pv", [("2x8g8", 4, 280, {"p_lr": 0.03, "p_beta1": 0.9}),
                                                 ("1x8g8", 12, 250, {"p_lr": 0.01, "p_beta1": 0.9}),
                                                 ("vq8g8", 12, 250, {"p_lr": 0.01, "p_beta1": 0.9})])
def test_the_smollm2_preset_runs_the_recipe_measured_on_smollm2(fmt, rounds, steps, pv):
    from llm.cli import _calib_cfg, _ft_cfg, _preset

    a = _pipeline_args(fmt, "--preset", "smollm2")
    cal, ft, s = _calib_cfg(a), _ft_cfg(a, "pv"), _settings(a)
    assert (_preset(a)["nsamples"], cal.rounds, cal.block_tune_steps) == (512, rounds, 100)
    assert (ft.steps, ft.batch_size, ft.lr, ft.v_optimizer) == (steps, 64, 1e-3, "lamb")
    assert {k: getattr(s, k) for k in pv} == pv and s.p_warmup == 5
    assert _preset(_pipeline_args(fmt, "--preset", "smollm2", "--nsamples", "64"))["nsamples"] == 64
    assert _preset(_pipeline_args(fmt))["nsamples"] == 1024  # the format presets keep 1024 calibration sequences


def test_the_same_format_by_another_name_gets_the_same_recipe():
    from llm.cli import _calib_cfg, _ft_cfg

    vq, aqlm = _pipeline_args("vq8g8"), _pipeline_args("1x8g8")
    assert _ft_cfg(vq, "pv") == _ft_cfg(aqlm, "pv") and _settings(vq) == _settings(aqlm)
    assert (_calib_cfg(vq).block_tune_steps, _ft_cfg(vq, "pv").steps) == (1000, 220)  # 1x8g8's preset, not the default


def test_explicit_flags_override_the_preset_and_the_tuned_p_step():
    from llm.cli import _ft_cfg

    a = _pipeline_args("1x8g8", "--steps", "7", "--p-lr", "0.005", "--lr", "3e-4")
    s = _settings(a)
    assert (_ft_cfg(a, "pv").steps, s.p_lr, _ft_cfg(a, "pv").lr, s.p_fraction) == (7, 0.005, 3e-4, 1e-3)  # the tuned fraction
    s = _settings(_pipeline_args("int2g128", "--p-select", "update", "--p-memory", "0"))
    assert (s.p_select, s.p_memory, s.p_lr) == ("update", 0.0, 1e-3)  # p_lr still the scalar grid's tuned one
    assert _settings(_pipeline_args("2x8g8", "--p-lr", "0.2"), "ste").p_lr == 0.2  # a flag sets every strategy's
    json_flag = _pipeline_args("2x8g8", "--p-lr", "0.2", "--strategy-settings", '{"pv": {"p_lr": 0.05}}')
    assert _settings(json_flag).p_lr == 0.05 and _settings(json_flag, "ste").p_lr == 0.2  # the JSON over the flag


def test_pv_warms_its_p_step_up_on_codebooks_unless_a_flag_says_otherwise():
    def warmup(fmt: str, strategy: str = "pv", *flags) -> int:
        return _settings(_pipeline_args(fmt, *flags), strategy).p_warmup

    assert warmup("1x8g8") == warmup("vq10g8") == warmup("2x6g8") == warmup("2x8g8") == warmup("vq8g4") == 5
    assert warmup("int1g64") == warmup("int2g128") == warmup("1x8g8", "ste") == warmup("2x8g8", "linearized_pv") == 0
    assert warmup("1x8g8", "pv", "--p-warmup", "0") == 0 and warmup("2x8g8", "pv", "--p-warmup", "3") == 3


def test_calibrate_draws_the_calibration_sequences_of_its_seed_as_the_pipeline_does(tmp_path, monkeypatch):
    import llm.pipeline

    model = tiny_model_dir(tmp_path)
    train, _ = tiny_corpus(tmp_path)
    seen = []

    def draw(model_dir, train, seq_len, nsamples, seed=0, train_chars=None):
        seen.append(seed)
        raise KeyboardInterrupt  # the draw is all this test needs

    monkeypatch.setattr(llm.pipeline, "train_sequences", draw)
    code = main(["calibrate", str(model), "--train", str(train), "--out", str(tmp_path / "ck"), "--format", "1x6g8",
                 "--seed", "3", "--device", "cpu"])
    assert code != 0 and seen == [3] and not (tmp_path / "ck").exists()


@contextmanager
def killed_once_the_first_block_is_saved(monkeypatch):
    """A calibration inside this block stops (KeyboardInterrupt) right after its first partial checkpoint."""
    import llm.checkpoint

    saved = llm.checkpoint.save_partial_calibration

    def save_then_die(*a, **k):
        saved(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.checkpoint, "save_partial_calibration", save_then_die)
    yield
    monkeypatch.setattr(llm.checkpoint, "save_partial_calibration", saved)


def test_an_interrupted_calibration_resumes_at_its_next_block_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    import llm.calibrate
    from llm.checkpoint import read_tensors

    model = tiny_model_dir(tmp_path)
    train, _ = tiny_corpus(tmp_path)
    flags = ["--train", str(train), "--format", "1x6g8", "--nsamples", "4", "--seq-len", "32", "--rounds", "1",
             "--block-tune-steps", "2", "--device", "cpu"]
    hessians = []
    counted = llm.calibrate.collect_hessians
    monkeypatch.setattr(llm.calibrate, "collect_hessians", lambda *a: hessians.append(1) or counted(*a))
    assert main(["calibrate", str(model), "--out", str(tmp_path / "whole"), *flags]) == 0
    per_run = len(hessians)

    with killed_once_the_first_block_is_saved(monkeypatch):
        assert main(["calibrate", str(model), "--out", str(tmp_path / "cut"), *flags]) != 0  # "interrupted: rerun ..."
    assert (tmp_path / "cut.partial").is_dir() and not (tmp_path / "cut").exists()
    hessians.clear()
    assert main(["calibrate", str(model), "--out", str(tmp_path / "cut"), *flags]) == 0
    assert len(hessians) == per_run // 2  # two blocks: only the second one was calibrated again
    assert not (tmp_path / "cut.partial").exists()
    whole, cut = (read_tensors(tmp_path / d / "model.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_partial_calibration_of_other_settings_is_refused_in_one_line(tmp_path):
    model = tiny_model_dir(tmp_path)
    train, _ = tiny_corpus(tmp_path)
    flags = ["--train", train, "--nsamples", "4", "--seq-len", "32", "--rounds", "1", "--block-tune-steps", "1",
             "--device", "cpu", "--out", tmp_path / "o"]
    from llm.checkpoint import save_partial_calibration
    from llm.model import load_model

    save_partial_calibration(tmp_path / "o.partial", load_model(model, torch.float32, "cpu"), 0, {"layers": [], "blocks": []},
                             {"run": {"seq_len": 64}})
    assert_one_line_error(run_cli("calibrate", model, *flags, "--format", "1x6g8"), "holds another run")
    assert (tmp_path / "o.partial").is_dir() and not (tmp_path / "o").exists()


def test_a_pipeline_killed_while_calibrating_resumes_from_its_partial_calibration(tmp_path, monkeypatch, capsys):
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    args = ["pipeline", model, "--train", train, "--validation", val, "--out", tmp_path / "run", "--format", "1x6g8",
            "--strategies", "continuous", "--steps", "1", "--nsamples", "4", "--seq-len", "32", "--rounds", "1",
            "--block-tune-steps", "1", "--ft-batch-size", "2", "--eval-windows", "2", "--device", "cpu"]
    with killed_once_the_first_block_is_saved(monkeypatch):
        assert main(list(map(str, args))) != 0
    assert (tmp_path / "run" / "calibrated.partial").is_dir() and not (tmp_path / "run" / "calibrated").exists()
    capsys.readouterr()
    assert main(list(map(str, args))) == 0
    assert "resuming the calibration at block 1 of 2" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["calibrated", "continuous", "summary.json"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(json.loads((tmp_path / "run" / "calibrated" / "meta.json").read_text())["calibration"]["blocks"]) == 2
    assert summary["calibration_seconds"] > 0
