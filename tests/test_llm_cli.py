"""The console script: the whole pipeline on a tiny model, and one-line errors for bad input."""
import json
import subprocess
import sys

import pytest

from llm.cli import main
from llm_helpers import tiny_corpus, tiny_model_dir


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.cli", *map(str, args)], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("pvtuning: error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr


def test_pipeline_runs_end_to_end_and_resumes(tmp_path, capsys):
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    args = ["pipeline", model, "--train", train, "--validation", val, "--out", tmp_path / "run", "--format", "1x6g8",
            "--strategies", "continuous,pv", "--steps", "3", "--nsamples", "8", "--seq-len", "32", "--rounds", "1", "--block-tune-steps", "2",
            "--ft-batch-size", "4", "--eval-windows", "4", "--device", "cpu"]
    assert main(list(map(str, args))) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["runs"]) == {"continuous", "pv"} and summary["ppl_calibrated"] > 1
    assert main(list(map(str, args))) == 0  # everything is checkpointed: a rerun resumes and finishes
    assert main(["export", str(tmp_path / "run" / "pv"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run" / "pv"), "--prompt", "the model", "--new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and json.loads(out.err.strip().splitlines()[-1])["tokens_per_s"] > 0


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


def test_bad_format_string(tmp_path):
    model = tiny_model_dir(tmp_path)
    assert_one_line_error(run_cli("calibrate", model, "--train", "x", "--out", tmp_path / "o", "--format", "2bits"),
                          "unknown quantization format")


def test_generate_with_an_empty_prompt(tmp_path):
    model = tiny_model_dir(tmp_path)
    assert_one_line_error(run_cli("generate", model, "--prompt", "", "--device", "cpu"), "prompt is empty")
