"""The CLI never loses a user's data, never gives a wrong number, and answers bad input with one line."""
import json
import lzma
import os

import pytest
import torch

import llm.checkpoint as C
from llm.cli import main
from llm.data import read_text, tokenize
from llm_helpers import tiny_corpus, tiny_model, tiny_model_dir

CALIB = ["--format", "1x6g8", "--nsamples", "4", "--seq-len", "16", "--rounds", "1", "--block-tune-steps", "1",
         "--calib-batch-size", "4", "--device", "cpu"]
FT = ["--steps", "2", "--ft-batch-size", "2", "--nsamples", "4", "--seq-len", "16", "--device", "cpu"]


def cli(capsys, *args) -> tuple:
    """(exit code, stderr lines starting with 'pvtuning: error:') of one in-process CLI call."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [l for l in err.splitlines() if l.startswith("pvtuning: error:")]


def assert_one_line(result, pattern):
    code, lines = result
    assert code == 2 and len(lines) == 1 and pattern in lines[0], lines


@pytest.fixture
def setup(tmp_path):
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    return model, train, val


@pytest.fixture
def calibrated(setup, tmp_path, capsys):
    model, train, _ = setup
    assert cli(capsys, "calibrate", model, "--train", train, "--out", tmp_path / "cal", *CALIB)[0] == 0
    return tmp_path / "cal"


def test_out_never_deletes_user_files(setup, tmp_path, capsys):
    model, train, val = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", mine, *CALIB), "holding other files")
    assert_one_line(cli(capsys, "pipeline", model, "--train", train, "--validation", val, "--out", mine, *CALIB),
                    "holding other files")
    assert (mine / "notes.txt").read_text() == "my notes" and len(list(mine.iterdir())) == 1
    a_file = tmp_path / "result.bin"
    a_file.write_bytes(b"precious")
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", a_file, *CALIB), "is an existing file")
    assert a_file.read_bytes() == b"precious"


def test_overwrite_replaces_a_user_folder_only_when_asked(setup, tmp_path, capsys):
    model, train, _ = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert cli(capsys, "calibrate", model, "--train", train, "--out", mine, "--overwrite", *CALIB)[0] == 0
    assert C.is_checkpoint(mine)


def test_rerunning_a_calibration_keeps_it_and_a_changed_one_is_refused(calibrated, setup, capsys):
    model, train, _ = setup
    before = (calibrated / "model.safetensors").read_bytes()
    assert cli(capsys, "calibrate", model, "--train", train, "--out", calibrated, *CALIB)[0] == 0
    assert (calibrated / "model.safetensors").read_bytes() == before
    other = [a if a != "1x6g8" else "1x4g8" for a in CALIB]
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", calibrated, *other), "holds another run")


def test_token_cache_never_serves_another_file(tmp_path):
    from llm.model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir(tmp_path))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "val.txt").write_text("the P step changes codes " * 50)
    (tmp_path / "b" / "val.txt").write_text("the V step changes value " * 50)
    assert (tmp_path / "a" / "val.txt").stat().st_size == (tmp_path / "b" / "val.txt").stat().st_size
    cache = tmp_path / "cache"
    first = tokenize(tmp_path / "a" / "val.txt", tok, cache=cache)
    second = tokenize(tmp_path / "b" / "val.txt", tok, cache=cache)
    assert not torch.equal(first, second)
    assert torch.equal(second, tokenize(tmp_path / "b" / "val.txt", tok, cache=None))


@pytest.mark.parametrize("flag,value,pattern", [
    ("--steps", "0", "argument --steps: must be >= 1"),
    ("--seq-len", "1", "argument --seq-len: must be >= 2"),
    ("--eval-windows", "0", "argument --eval-windows: must be >= 1"),
    ("--trust-ratio", "-1", "setting trust_ratio must be > 0"),
    ("--p-fraction", "1.5", "setting p_fraction must be in (0, 1]"),
    ("--p-memory", "1.5", "setting p_memory must be in [0, 1]"),
    ("--p-metric", "cosine", "argument --p-metric: invalid choice"),
    ("--strategy-settings", '{"pv": {"p_memory": 0.5, "trust_ratio": 0.1}}', "p_memory must be 0 with trust_ratio"),
    ("--strategy-settings", '{"pv": {"p_memory": -1}}', "p_memory must be in [0, 1]"),
    ("--lr", "abc", "'abc' is not a number"),
    ("--strategies", ",", "names no strategy"),
    ("--strategies", "pv,PV", "unknown strategy 'PV'"),
    ("--strategy-settings", '{"PV": {"p_fraction": 0.5}}', "unknown strategy 'PV'"),
    ("--strategy-settings", '{"pv": {"tua": 0.5}}', "unknown setting 'tua'"),
    ("--strategy-settings", '{"pv": {"tau": 0.5}}', "unknown setting 'tau'"),
    ("--strategy-settings", '{"pv": {"p_fraction": 5}}', "p_fraction must be in (0, 1]"),
    ("--preset", "3bit", "unknown --preset '3bit'"),
    ("--preset", "smollm2", "--preset smollm2 has recipes for 2x8g8, 1x8g8 only, not 1x6g8"),
])
def test_bad_pipeline_arguments_are_one_line_errors_and_write_nothing(setup, tmp_path, capsys, flag, value, pattern):
    model, train, val = setup
    out = tmp_path / "run"
    assert_one_line(cli(capsys, "pipeline", model, "--train", train, "--validation", val, "--out", out,
                        *CALIB, flag, value), pattern)
    assert not out.exists()


def test_new_tokens_below_one_is_refused(setup, capsys):
    model, _, _ = setup
    assert_one_line(cli(capsys, "generate", model, "--prompt", "x", "--new-tokens", "-1"), "must be >= 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is present")
def test_device_cuda_without_a_gpu_is_refused_before_work(setup, tmp_path, capsys):
    model, train, _ = setup
    args = [a if a != "cpu" else "cuda" for a in CALIB]
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", tmp_path / "o", *args),
                    "no CUDA GPU is available")
    assert not (tmp_path / "o").exists()


def test_out_that_cannot_be_written_is_refused_before_work(setup, tmp_path, capsys):
    model, train, _ = setup
    (tmp_path / "afile").write_text("x")
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", tmp_path / "afile" / "ck", *CALIB),
                    "cannot be written")


@pytest.mark.parametrize("content,pattern", [(b"not xz at all", "not valid xz"),
                                             (lzma.compress(b"ok")[:-9] + b"\0" * 9, "not valid xz"),
                                             (b"\xff\xfe bad bytes", "not UTF-8")])
def test_damaged_corpus_is_one_line_error(setup, tmp_path, capsys, content, pattern):
    model, _, val = setup
    bad = tmp_path / ("bad.txt.xz" if pattern == "not valid xz" else "bad.txt")
    bad.write_bytes(content)
    assert_one_line(cli(capsys, "eval", model, "--validation", bad, "--device", "cpu"), pattern)


def test_truncated_checkpoint_and_model_weights_are_one_line_errors(calibrated, setup, tmp_path, capsys):
    model, _, val = setup
    weights = calibrated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    assert_one_line(cli(capsys, "eval", calibrated, "--validation", val, "--device", "cpu"), "damaged or truncated")
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[:300])
    assert_one_line(cli(capsys, "eval", model, "--validation", val, "--device", "cpu"), "could not load")


def test_pickle_weights_with_code_are_refused_with_one_line(tmp_path, capsys):
    d = tiny_model_dir(tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": os.getcwd}, d / "pytorch_model.bin")
    _, val = tiny_corpus(tmp_path)
    code, lines = cli(capsys, "eval", d, "--validation", val, "--device", "cpu")
    assert code == 2 and len(lines) == 1 and "could not load" in lines[0] and "weights_only=False" not in lines[0]


def test_finetune_rerun_with_fewer_steps_is_refused_and_keeps_the_checkpoint(calibrated, setup, tmp_path, capsys):
    _, train, _ = setup
    out = tmp_path / "ft"
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "4")[0] == 0
    meta = json.loads((out / "meta.json").read_text())
    assert_one_line(cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "2"),
                    "holds 4 steps, more than the 2 asked for")
    assert json.loads((out / "meta.json").read_text()) == meta


def test_resume_refuses_a_checkpoint_of_another_run(calibrated, setup, tmp_path, capsys):
    _, train, _ = setup
    out = tmp_path / "ft"
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT)[0] == 0
    assert_one_line(cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--lr", "0.5"),
                    "holds another run (finetune.lr: 0.001 there, 0.5 now)")  # the setting that differs, named
    other_train = tmp_path / "other.txt"
    other_train.write_text(train.read_text()[::-1])
    assert_one_line(cli(capsys, "finetune", calibrated, "--train", other_train, "--out", out, *FT), "holds another run")
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT)[0] == 0  # the same run: done


def test_checkpoint_write_killed_between_the_renames_recovers(tmp_path, monkeypatch):
    model = tiny_model()
    C.save_checkpoint(tmp_path / "ck", model, {"step": 1})
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old checkpoint is already .ck.old, the new one not yet in place
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path / "ck", model, {"step": 2})
    monkeypatch.setattr(C.os, "replace", real_replace)
    assert not (tmp_path / "ck").exists() and (tmp_path / ".ck.old").exists()
    assert C.read_meta(tmp_path / "ck")["step"] == 1  # recovered from .ck.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_stale_temporaries_of_a_killed_write_are_removed_and_user_files_kept(tmp_path):
    model = tiny_model()
    C.save_checkpoint(tmp_path / "ck", model, {"step": 1})
    stale = tmp_path / ".ck.abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    users = tmp_path / ".ck.mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    C.save_checkpoint(tmp_path / "ck", model, {"step": 2})
    assert not stale.exists() and (users / "notes.txt").read_text() == "keep"
    assert C.read_meta(tmp_path / "ck")["step"] == 2


def _write_corpora(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    text = "\n\n".join(docs)
    (tmp_path / "c.txt").write_text(text)
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(text.encode()))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "c_dataset"))
    return text


def test_every_corpus_format_reads_as_the_same_text(tmp_path):
    pytest.importorskip("pyarrow")
    docs = ["The P step changes codes.", "The V step changes codebooks.\nTwo lines.", "Ünïcode ✓"]
    text = _write_corpora(tmp_path, docs)
    for name in ("c.txt", "c.txt.xz", "c.jsonl", "c.parquet", "c_dataset"):
        assert read_text(tmp_path / name) == text, name


def test_corpus_without_a_text_field_is_one_line_error(setup, tmp_path, capsys):
    model, _, _ = setup
    (tmp_path / "v.jsonl").write_text('{"content": "x"}\n')
    assert_one_line(cli(capsys, "eval", model, "--validation", tmp_path / "v.jsonl", "--device", "cpu"),
                    'no string field "text"')


def test_pipeline_overwrite_replaces_a_user_folder_only_after_its_inputs_pass(setup, tmp_path, capsys):
    model, train, val = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    assert_one_line(cli(capsys, "pipeline", model, "--train", bad, "--validation", val, "--out", mine, "--overwrite",
                        *CALIB, *FT[:4], "--strategies", "continuous"), "not UTF-8")
    assert (mine / "notes.txt").exists()  # a failure before any work deletes nothing
    assert cli(capsys, "pipeline", model, "--train", train, "--validation", val, "--out", mine, "--overwrite",
               *CALIB, *FT[:4], "--strategies", "continuous", "--eval-windows", "2")[0] == 0
    assert not (mine / "notes.txt").exists() and (mine / "summary.json").exists()


def test_pipeline_killed_midway_resumes_to_the_uninterrupted_result(setup, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    model, train, val = setup
    args = ["pipeline", model, "--train", train, "--validation", val, *CALIB, "--steps", "12", "--ft-batch-size", "2",
            "--strategies", "pv,continuous", "--eval-windows", "2"]
    env = dict(os.environ, PVTUNING_CACHE=str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "llm.cli", *map(str, args), "--out", str(whole)], env=env, check=True,
                   capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "llm.cli", *map(str, args), "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "calibrated" / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during fine-tuning (or just after calibration)
    proc.wait()
    subprocess.run([sys.executable, "-m", "llm.cli", *map(str, args), "--out", str(cut)], env=env, check=True,
                   capture_output=True, timeout=600)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a["ppl_calibrated"] == b["ppl_calibrated"]
    for s in ("pv", "continuous"):
        assert b["runs"][s]["losses"] == pytest.approx(a["runs"][s]["losses"], rel=1e-6)
        assert b["runs"][s]["ppl"] == pytest.approx(a["runs"][s]["ppl"], rel=1e-6)
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())  # nothing stale left


def test_a_checkpoint_left_only_as_old_by_a_kill_is_used_by_every_command(calibrated, setup, capsys):
    _, _, val = setup
    os.replace(calibrated, calibrated.with_name(f".{calibrated.name}.old"))  # the kill fell between the renames
    code, lines = cli(capsys, "eval", calibrated, "--validation", val, "--eval-windows", "2", "--seq-len", "16",
                      "--device", "cpu")
    assert code == 0 and not lines
    assert C.is_checkpoint(calibrated) and not calibrated.with_name(f".{calibrated.name}.old").exists()


def test_a_damaged_or_unwritable_perplexity_cache_is_computed_again(tmp_path, monkeypatch):
    from llm import pipeline

    monkeypatch.setattr("llm.data.CACHE", tmp_path / "cache")
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, **k: 7.0)
    model, val = torch.nn.Linear(2, 2), torch.zeros(3, 8, dtype=torch.long)
    assert pipeline.evaluate(model, val, "cpu", amp=False, weights="w") == 7.0
    (cached,) = (tmp_path / "cache").glob("ppl-*.json")
    cached.write_text("{not json")
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, **k: 8.0)
    assert pipeline.evaluate(model, val, "cpu", amp=False, weights="w") == 8.0  # recomputed, not trusted
    assert pipeline.evaluate(model, val, "cpu", amp=False, weights="w") == 8.0  # and kept
    assert pipeline.evaluate(model, val, "cpu", amp=False, weights="other") == 8.0 and len(list(cached.parent.glob("ppl-*.json"))) == 2
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("llm.data.CACHE", tmp_path / "a-file" / "cache")  # no cache can be made: computed
    assert pipeline.evaluate(model, val, "cpu", amp=False, weights="w") == 8.0
