# ruff: noqa: F811  (pytest fixtures imported from test_llm_data_safety are requested by name)
"""What the CLI survives beyond bad arguments: a second process on the same --out, SIGTERM and Ctrl-C, a full disk,
damaged checkpoints, damaged input weights, an export cut short. Each case: one line, nothing lost, a rerun that
gives the uninterrupted result."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import llm.checkpoint as C
import llm.export as E
from llm.runlock import holding_out, lock_path
from llm_helpers import tiny_corpus, tiny_model_dir
from test_llm_data_safety import CALIB, FT, assert_one_line, calibrated, cli, setup  # noqa: F401 (fixtures)

FT = [*FT, "--ft-nsamples", "8"]  # the data of 4 steps drawn for every run, so that a longer run resumes a shorter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of each test's own (locks, tokens, perplexities), for in-process calls and subprocesses alike; autouse,
    so that the fixtures shared with test_llm_data_safety (setup, calibrated) run under it."""
    from llm import data

    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("PVTUNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _holder(path, cache) -> subprocess.Popen:
    """Another process that takes --out's lock and keeps it until it is killed."""
    code = ("import sys, time\nfrom llm.runlock import holding_out\nwith holding_out(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, PVTUNING_CACHE=str(cache)))
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_process_on_the_same_out_is_refused_and_a_killed_holder_blocks_nothing(calibrated, setup, tmp_path,
                                                                                       capsys, cache):
    model, train, val = setup
    commands = {
        "pipeline": ["pipeline", model, "--train", train, "--validation", val, *CALIB, *FT[:4], "--strategies",
                     "continuous", "--eval-windows", "2"],
        "calibrate": ["calibrate", model, "--train", train, *CALIB],
        "finetune": ["finetune", calibrated, "--train", train, *FT],
        "export": ["export", calibrated],
    }
    for name, args in commands.items():
        out = tmp_path / f"out-{name}"
        holder = _holder(out, cache)
        try:
            assert_one_line(cli(capsys, *args, "--out", out), "is being written by another pvtuning process")
            assert not out.exists()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert cli(capsys, *args, "--out", out)[0] == 0, name  # the dead holder's lock is gone with it
        assert not lock_path(out).exists()


def test_the_out_lock_is_one_per_real_path(tmp_path, cache):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with holding_out(tmp_path / "real"):
        with pytest.raises(ValueError, match="being written by another"):
            with holding_out(tmp_path / "link"):
                pass
        with holding_out(tmp_path / "other"):  # another output: no conflict
            pass
    with holding_out(tmp_path / "link"):  # released
        pass


# --- signals --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(pipeline arguments, the uninterrupted run's summary), computed once for the signal tests."""
    base = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_model_dir(base)
    train, val = tiny_corpus(base)
    args = ["pipeline", model, "--train", train, "--validation", val, *CALIB, "--steps", "12", "--ft-batch-size",
            "2", "--strategies", "pv,continuous", "--eval-windows", "2"]
    done = _run(args, base / "whole", base / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    return args, base / "whole"


def _command(args, out) -> list:
    return [sys.executable, "-m", "llm.cli", *map(str, args), "--out", str(out)]


def _run(args, out, cache) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PVTUNING_CACHE=str(cache)))


@pytest.mark.parametrize("sig, moment", [(signal.SIGTERM, "calibration"), (signal.SIGINT, "fine-tuning"),
                                         (signal.SIGTERM, "fine-tuning")])
def test_sigterm_and_ctrl_c_stop_with_one_line_and_the_rerun_gives_the_uninterrupted_result(uninterrupted, tmp_path,
                                                                                            sig, moment):
    args, whole = uninterrupted
    cut, cache = tmp_path / "cut", tmp_path / "cache"
    proc = subprocess.Popen(_command(args, cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PVTUNING_CACHE=str(cache)))
    marker = cut / ("calibrated.partial" if moment == "calibration" else "calibrated") / "meta.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip(f"the run finished before {moment} could be interrupted")
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("pvtuning:")]
    assert len(lines) == 1 and "stopped by" in lines[0] and "rerun the same command" in lines[0], err[-2000:]
    assert _run(args, cut, cache).returncode == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a["ppl_calibrated"] == b["ppl_calibrated"]
    for s in ("pv", "continuous"):
        assert b["runs"][s]["losses"] == pytest.approx(a["runs"][s]["losses"], rel=1e-6)
        assert b["runs"][s]["ppl"] == pytest.approx(a["runs"][s]["ppl"], rel=1e-6)
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())


# --- a full disk ----------------------------------------------------------------------------------------
def _no_space(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(calibrated, setup, tmp_path,
                                                                                      capsys, monkeypatch):
    _, train, _ = setup
    whole, out = tmp_path / "whole", tmp_path / "ft"
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", whole, *FT, "--steps", "4")[0] == 0
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "2")[0] == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(C, "save_file", _no_space)
        assert_one_line(cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "4"),
                        "No space left on device")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the step-2 checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ft")) == []  # no temporaries left
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "4")[0] == 0
    assert C.read_meta(out)["losses"] == pytest.approx(C.read_meta(whole)["losses"], rel=1e-6)


def test_a_full_disk_during_an_export_leaves_the_previous_export_or_none(calibrated, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    with monkeypatch.context() as m:
        m.setattr(E, "save_file", _no_space)
        assert_one_line(cli(capsys, "export", calibrated, "--out", out), "No space left on device")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    assert cli(capsys, "export", calibrated, "--out", out)[0] == 0
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(E, "save_file", _no_space)
        assert_one_line(cli(capsys, "export", calibrated, "--out", out, "--overwrite"), "No space left on device")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first


# --- an export cut short ----------------------------------------------------------------------------------
def test_an_export_stopped_midway_leaves_no_half_written_folder(calibrated, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    real = E.save_file

    def stopped_after_writing(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt  # Ctrl-C right after the weights, before config and tokenizer

    with monkeypatch.context() as m:
        m.setattr(E, "save_file", stopped_after_writing)
        assert cli(capsys, "export", calibrated, "--out", out)[0] == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    stale = tmp_path / ".hf.k1ll3d"  # what a SIGKILL at that instant leaves: a marked temporary
    stale.mkdir()
    (stale / C.PARTIAL_MARK).touch()
    (stale / "model.safetensors").write_bytes(b"half")
    assert cli(capsys, "export", calibrated, "--out", out)[0] == 0
    assert E.is_export(out) and not stale.exists()


def test_an_export_into_a_folder_of_other_files_is_refused_like_any_out(calibrated, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert_one_line(cli(capsys, "export", calibrated, "--out", out), "holding other files")
    assert (out / "notes.txt").read_text() == "keep"


# --- damaged checkpoints ------------------------------------------------------------------------------------
def _flip_a_bit(path, at: float = 0.7) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoints_tensors_is_refused_with_one_line(calibrated, setup, tmp_path, capsys):
    _, train, val = setup
    out = tmp_path / "ft"
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT)[0] == 0
    _flip_a_bit(out / "state.safetensors")
    assert_one_line(cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "3"),
                    "state.safetensors does not match the checksum")
    _flip_a_bit(calibrated / "model.safetensors")
    assert_one_line(cli(capsys, "eval", calibrated, "--validation", val, "--device", "cpu"),
                    "model.safetensors does not match the checksum")


@pytest.mark.parametrize("edit", ["more steps", "other settings", "a lost loss"])
def test_a_meta_json_changed_after_it_was_written_is_refused_with_one_line(calibrated, setup, tmp_path, capsys, edit):
    _, train, _ = setup
    out = tmp_path / "ft"
    assert cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT)[0] == 0
    meta = json.loads((out / "meta.json").read_text())
    if edit == "more steps":
        meta["step"] += 1
    elif edit == "other settings":
        meta["run"]["finetune"]["lr"] *= 2
    else:
        meta["losses"] = meta["losses"][:-1]
    (out / "meta.json").write_text(json.dumps(meta))
    assert_one_line(cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "3"),
                    "does not match its checksum")
    del meta["checksums"]  # no checksum to compare (as a checkpoint of an older pvtuning): still refused
    (out / "meta.json").write_text(json.dumps(meta))
    code, lines = cli(capsys, "finetune", calibrated, "--train", train, "--out", out, *FT, "--steps", "3")
    assert code == 2 and len(lines) == 1, lines


# --- damaged input weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["nan", "inf", "zeros"])
def test_non_finite_or_zero_weights_are_refused_before_work_naming_the_tensor(tmp_path, capsys, cache, damage):
    from safetensors.torch import load_file, save_file

    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    f = model / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "zeros":
        sd[name] = torch.zeros_like(sd[name])
    else:
        sd[name][3, 5] = float(damage)
    save_file(sd, f, metadata={"format": "pt"})
    assert_one_line(cli(capsys, "calibrate", model, "--train", train, "--out", tmp_path / "cal", *CALIB), name)
    assert not (tmp_path / "cal").exists()
    assert_one_line(cli(capsys, "eval", model, "--validation", val, "--device", "cpu"), name)


# --- corpora, models, plugins and generation at the edges ---------------------------------------------------
def test_eval_windows_beyond_the_data_is_refused_with_one_line(setup, capsys):
    model, _, val = setup
    assert_one_line(cli(capsys, "eval", model, "--validation", val, "--seq-len", "16", "--eval-windows", "1000000",
                        "--device", "cpu"), "ask for at most")


@pytest.mark.parametrize("content, pattern", [
    ('{"text": "a b c"}\n{"body": "x"}\n', 'line 2 has no string field "text"'),
    (b"good text\n\xff\xfe bad bytes\n", "is not UTF-8"),
])
def test_a_corpus_with_some_bad_lines_is_refused_naming_the_line(setup, tmp_path, capsys, content, pattern):
    model, _, _ = setup
    bad = tmp_path / ("bad.jsonl" if isinstance(content, str) else "bad.txt")
    bad.write_bytes(content.encode() if isinstance(content, str) else content)
    assert_one_line(cli(capsys, "eval", model, "--validation", bad, "--device", "cpu"), pattern)


def test_a_corpus_of_one_huge_line_reads_like_any_text(setup, tmp_path, capsys):
    model, _, val = setup
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(val.read_text().replace("\n", " ") * 4)
    assert cli(capsys, "eval", model, "--validation", one_line, "--seq-len", "16", "--eval-windows", "2",
               "--device", "cpu")[0] == 0


def test_models_that_are_not_one_readable_gguf_are_refused_with_one_line(setup, tmp_path, capsys):
    _, _, val = setup
    (tmp_path / "fake.gguf").write_text("not a gguf file")
    assert_one_line(cli(capsys, "eval", tmp_path / "fake.gguf", "--validation", val, "--device", "cpu"),
                    "could not read the GGUF model")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_text("x")
    assert_one_line(cli(capsys, "eval", two, "--validation", val, "--device", "cpu"), "holds 2 GGUF files")


@pytest.mark.parametrize("plugin, pattern", [
    (None, "ModuleNotFoundError"),
    ("raise RuntimeError('plugin broke')\n", "RuntimeError: plugin broke"),
    ("from llm.strategies import register_strategy\nregister_strategy('pv', lambda s, ctx: None)\n",
     "'pv' is already registered"),
])
def test_an_import_that_is_missing_raises_or_registers_twice_is_one_line(setup, tmp_path, capsys, plugin, pattern):
    model, train, val = setup
    module = "no_such_plugin_module"
    if plugin is not None:
        (tmp_path / "plugin.py").write_text(plugin)
        module = str(tmp_path / "plugin.py")
    assert_one_line(cli(capsys, "pipeline", model, "--train", train, "--validation", val, "--out", tmp_path / "o",
                        "--import", module), pattern)
    assert not (tmp_path / "o").exists()


def test_generation_with_an_empty_or_too_long_prompt_is_one_line(setup, capsys):
    model, _, _ = setup
    assert_one_line(cli(capsys, "generate", model, "--prompt", "  ", "--device", "cpu"), "--prompt is empty")
    assert_one_line(cli(capsys, "generate", model, "--prompt", "word " * 5000, "--device", "cpu"),
                    "exceed the model's")


def test_a_parquet_without_text_or_a_damaged_datasets_folder_is_one_line(setup, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, _, _ = setup
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    assert_one_line(cli(capsys, "eval", model, "--validation", tmp_path / "c.parquet", "--device", "cpu"),
                    'has no "text" column')
    damaged = tmp_path / "ds"
    damaged.mkdir()
    (damaged / "dataset_info.json").write_text("{not json")
    assert_one_line(cli(capsys, "eval", model, "--validation", damaged, "--device", "cpu"),
                    "is not a folder written by datasets' save_to_disk")
