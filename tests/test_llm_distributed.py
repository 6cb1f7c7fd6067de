"""Data-parallel fine-tuning: micro-batches and processes split a step without changing it.

Two gloo processes on the CPU stand in for two GPUs: at the same global batch, with the teacher's
layers sharded between them, they give the loss curve and the model of one process, and their checkpoint (P-step state gathered from the layers'
owners) resumes in one process as if the run had never been split.
"""
import copy
import math
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llm import distributed as D
from llm.calibrate import CalibrationConfig, calibrate
from llm.finetune import finetune
from llm.model import decoder_layers
from llm_helpers import ft_config, tiny_model

SEQS = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(1))
P_SETTINGS = {"p_lr": 3e-3, "p_fraction": 0.05, "p_beta1": 0.9}
CFG = dict(batch_size=8, lr=1e-3, checkpoint_every=2, seed=3)


def calibrated():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    calibrate(student, SEQS, CalibrationConfig(fmt="1x6g8", rounds=1, forward_batch_size=8, block_tune_steps=0), progress=False)
    return teacher, student


def assert_same_model(a, b, atol=1e-5):
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=atol), n


def test_micro_batches_give_the_step_of_the_whole_batch():
    teacher, student = calibrated()
    whole, split = copy.deepcopy(student), copy.deepcopy(student)
    rep_whole = finetune(whole, teacher, SEQS, ft_config("pv", P_SETTINGS, steps=4, **CFG), progress=False)
    rep_split = finetune(split, teacher, SEQS, ft_config("pv", P_SETTINGS, steps=4, micro_batch_size=3, **CFG),
                         progress=False)
    assert rep_split["losses"] == pytest.approx(rep_whole["losses"], rel=1e-5)
    assert rep_split["codes_changed"] == rep_whole["codes_changed"]
    assert_same_model(whole, split)


def test_layers_are_dealt_out_to_owners_by_size(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 2)
    owners = D.layer_owners({"a": 100, "b": 60, "c": 50, "d": 10})
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}


def _in_gloo_group(rank: int, world: int, port: int, work, *args) -> None:
    """work(rank, world, *args) in process `rank` of a gloo group of `world` processes (mp.spawn's target),
    which it leaves as the CLI does (D.leave) when every rank is done, or at once when this one failed."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_from_env("gloo")
    try:
        work(rank, world, *args)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    D.leave()


def _finetune_worker(rank: int, world: int, out_dir: str) -> None:
    result = {}
    for strategy in ("pv", "ste"):
        teacher, student = calibrated()
        rep = finetune(student, teacher, SEQS, ft_config(strategy, P_SETTINGS, steps=4, **CFG),
                       checkpoint_dir=f"{out_dir}/ck-{strategy}", progress=False)
        v_held = [None] * world  # each rank's share of the optimizer state
        torch.distributed.all_gather_object(v_held, rep["v_parameters_held"])
        result[strategy] = {"losses": rep["losses"], "changed": rep["codes_changed"], "world": rep["world_size"],
                            "teacher_local": D.local_numel(teacher), "v_held": v_held}
        if rank == 1:  # the replicas must agree: rank 1 saves its copy beside rank 0's checkpoint
            torch.save(student.state_dict(), f"{out_dir}/rank1-{strategy}.pt")
    teacher, student = calibrated()  # the P step's gradients summed over processes in bfloat16
    rep = finetune(student, teacher, SEQS, ft_config("pv", P_SETTINGS, steps=4, p_grad_dtype="bfloat16", **CFG),
                   progress=False)
    result["pv_bf16"] = {"losses": rep["losses"], "changed": rep["codes_changed"]}
    teacher, student = calibrated()  # two micro-batches a process: the gradients travel in the second,
    D.GradientBuckets.__init__.__defaults__ = (None, 1000)  # a bucket per layer, sent during backward
    rep = finetune(student, teacher, SEQS, ft_config("pv", P_SETTINGS, steps=4, micro_batch_size=2, **CFG),
                   progress=False)
    result["pv_micro"] = {"losses": rep["losses"], "changed": rep["codes_changed"]}
    if rank == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_with_sharded_teacher_and_optimizer_state_give_the_loss_curve_of_one_and_resume_in_one(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    mp.spawn(_in_gloo_group, args=(2, _free_port(), _finetune_worker, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    from safetensors.torch import load_file

    from llm.checkpoint import read_meta

    for strategy in ("pv", "ste"):
        teacher, student = calibrated()
        one = copy.deepcopy(student)
        rep_one = finetune(one, teacher, SEQS, ft_config(strategy, P_SETTINGS, steps=6, **CFG), progress=False)
        assert result[strategy]["world"] == 2
        # each process held half of the teacher's decoder layers (FSDP2), the rest whole
        layers = sum(p.numel() for layer in decoder_layers(teacher) for p in layer.parameters())
        total = sum(p.numel() for p in teacher.parameters())
        assert result[strategy]["teacher_local"] == total - layers // 2
        # and the optimizer state of part of the student's continuous parameters (ZeRO-1), together all of them
        assert sum(result[strategy]["v_held"]) == rep_one["v_parameters_held"] > max(result[strategy]["v_held"])
        assert result[strategy]["losses"] == pytest.approx(rep_one["losses"][:4], rel=1e-5)
        assert result[strategy]["changed"] == rep_one["codes_changed"][:4]
        ck = tmp_path / f"ck-{strategy}"
        assert read_meta(ck)["step"] == 4
        saved, replica = load_file(ck / "model.safetensors"), torch.load(tmp_path / f"rank1-{strategy}.pt")
        assert all(torch.equal(saved[k], replica[k]) for k in saved)  # rank 0 wrote it; rank 1 holds the same
        # the two-process checkpoint (P-step state gathered from both owners) resumes in one process
        resumed = copy.deepcopy(student)
        rep = finetune(resumed, teacher, SEQS, ft_config(strategy, P_SETTINGS, steps=6, **CFG), checkpoint_dir=ck,
                       progress=False)
        assert rep["losses"] == pytest.approx(rep_one["losses"], rel=1e-5)
        assert_same_model(one, resumed)
        if strategy == "pv":  # bfloat16 sums: the loss curve of one process within bfloat16 noise
            assert result["pv_bf16"]["losses"] == pytest.approx(rep_one["losses"][:4], rel=1e-2)
            assert result["pv_micro"]["losses"] == pytest.approx(rep_one["losses"][:4], rel=1e-5)
            assert result["pv_micro"]["changed"] == rep_one["codes_changed"][:4]


def _calibration_worker(rank: int, world: int, out_dir: str, fmt: str) -> None:
    model = tiny_model("llama")
    rows = []
    forward = type(model.model.layers[0]).forward

    def counting(self, hidden, *args, **kw):  # the rows each process runs a block on while tuning it
        if torch.is_grad_enabled():
            rows.append(hidden.shape[0])
        return forward(self, hidden, *args, **kw)

    type(model.model.layers[0]).forward = counting
    report = calibrate(model, SEQS, CalibrationConfig(fmt=fmt, rounds=2, forward_batch_size=8, block_tune_steps=3),
                       progress=False)
    torch.save({"state": model.state_dict(), "errors": [l["relative_error"] for l in report["layers"]],
                "tune_losses": [b["tune_losses_first_last"] for b in report["blocks"]], "rows": rows},
               f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("fmt", ["1x6g8", "int2g16"])
def test_calibration_spread_over_two_processes_gives_the_model_of_one(tmp_path, fmt):
    """Each process quantizes the layers it owns and broadcasts them, and tunes each block on half of
    every batch with the gradients summed: both end with one process's model (block tuning's sums in
    another order: equal to float32 rounding)."""
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    mp.spawn(_in_gloo_group, args=(2, _free_port(), _calibration_worker, str(tmp_path), fmt), nprocs=2, join=True)
    one = tiny_model("llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same order of floating-point sums
    try:
        report = calibrate(one, SEQS, CalibrationConfig(fmt=fmt, rounds=2, forward_batch_size=8, block_tune_steps=3),
                           progress=False)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["rows"] == [4] * 3 * len(report["blocks"])  # 3 tuning steps per block on 4 of 8 rows
        flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
        assert flat(got["errors"]) == pytest.approx(flat(l["relative_error"] for l in report["layers"]), rel=1e-4)
        assert flat(got["tune_losses"]) == pytest.approx(flat(b["tune_losses_first_last"] for b in report["blocks"]),
                                                         rel=1e-4)
        for k, v in one.state_dict().items():
            assert torch.equal(got["state"][k], v) if not v.is_floating_point() else \
                torch.allclose(got["state"][k], v, rtol=1e-3, atol=1e-5), k  # GPTQ amplifies float32 drift


def test_models_built_on_the_meta_device_run_with_finite_values():
    """dist_finetune's builder for shapes larger than one GPU: nothing left on the meta device, every value set."""
    from experiments.dist_finetune import sharded_random_models
    from llm.formats import quantized_layers

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    teacher, student = sharded_random_models(shape, torch.device("cpu"), layers=2)
    for model in (teacher, student):
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(quantized_layers(student)) == 14
    cfg = ft_config("pv", {"p_lr": 1e-2, "p_fraction": 0.05}, steps=2, batch_size=2, lr=1e-3, amp=False)
    rep = finetune(student, teacher, SEQS[:4], cfg, progress=False)
    assert all(math.isfinite(l) and l > 0 for l in rep["losses"])
