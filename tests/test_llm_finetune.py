"""Fine-tuning: KL falls for every strategy; a resumed run equals an uninterrupted one."""
import copy
import json
import math
import warnings
from dataclasses import replace

import pytest
import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.checkpoint import load_checkpoint, read_meta, save_checkpoint
from llm.finetune import FinetuneConfig, FinetuneError, describe_seconds, finetune
from llm.optim import Lamb, lr_factor
from llm_helpers import ft_config, tiny_model

SEQS = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(1))


def calibrated(arch: str, fmt: str = "1x6g8"):
    teacher = tiny_model(arch)
    student = copy.deepcopy(teacher)
    calibrate(student, SEQS, CalibrationConfig(fmt=fmt, rounds=1, forward_batch_size=8, block_tune_steps=0), progress=False)
    return teacher, student


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("strategy", ["continuous", "pv"])
def test_kl_falls_during_finetuning(arch, strategy):
    teacher, student = calibrated(arch)
    cfg = ft_config(strategy, {"p_lr": 3e-3, "p_fraction": 0.02}, steps=25, batch_size=8, lr=3e-3, seed=0)
    rep = finetune(student, teacher, SEQS, cfg, progress=False)
    first, last = rep["losses"][0], sum(rep["losses"][-5:]) / 5
    assert last < 0.8 * first, rep["losses"]
    if strategy == "pv":
        assert sum(rep["codes_changed"]) > 0


@pytest.mark.parametrize("strategy", ["ste", "stochastic", "linearized_pv"])
def test_every_code_changing_strategy_runs_and_changes_codes(strategy):
    teacher, student = calibrated("llama")
    before = {n: b.clone() for n, b in student.named_buffers() if n.endswith("codes")}
    rep = finetune(student, teacher, SEQS, ft_config(strategy, {"p_lr": 3e-2}, steps=4, batch_size=4),
                   progress=False)
    assert len(rep["losses"]) == 4 and all(torch.isfinite(torch.tensor(rep["losses"])))
    after = {n: b for n, b in student.named_buffers() if n.endswith("codes")}
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("strategy,p_memory", [("pv", 0.0), ("pv", 1.0), ("stochastic", 0.0), ("ste", 0.0)])
def test_resumed_run_equals_uninterrupted_run(tmp_path, strategy, p_memory):
    teacher, student = calibrated("llama")
    settings = {"p_lr": 3e-3, "p_fraction": 0.05, "p_memory": p_memory}
    cfg = dict(batch_size=4, lr=1e-3, checkpoint_every=2, seed=3)
    whole = copy.deepcopy(student)
    rep_whole = finetune(whole, teacher, SEQS, ft_config(strategy, settings, steps=6, **cfg), progress=False)
    # "interrupted" after 3 steps: a run that stops there leaves its checkpoint ...
    part = copy.deepcopy(student)
    finetune(part, teacher, SEQS, ft_config(strategy, settings, steps=3, **cfg), checkpoint_dir=tmp_path / "ck",
             progress=False)
    assert read_meta(tmp_path / "ck")["step"] == 3
    # ... and a fresh process (a fresh copy of the calibrated model) resumes from it
    resumed = copy.deepcopy(student)
    first_seconds = read_meta(tmp_path / "ck")["seconds"]
    rep = finetune(resumed, teacher, SEQS, ft_config(strategy, settings, steps=6, **cfg), checkpoint_dir=tmp_path / "ck",
                   progress=False)
    assert rep["losses"] == pytest.approx(rep_whole["losses"], rel=1e-5)
    assert rep["seconds"] >= first_seconds + rep["seconds_this_call"] - 0.01  # the first 3 steps' time is kept
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n


def test_a_run_resumed_from_a_checkpoint_without_its_time_reports_only_the_steps_it_timed(tmp_path):
    teacher, student = calibrated("llama")
    cfg = dict(batch_size=4, checkpoint_every=2, seed=3)
    settings = {"p_lr": 3e-3, "p_fraction": 0.05}
    finetune(copy.deepcopy(student), teacher, SEQS, ft_config("pv", settings, steps=2, **cfg), checkpoint_dir=tmp_path / "ck",
             progress=False)
    meta_file = tmp_path / "ck" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["seconds"], meta["checksums"]  # as a checkpoint written before checkpoints recorded time and checksums
    meta_file.write_text(json.dumps(meta))
    rep = finetune(copy.deepcopy(student), teacher, SEQS, ft_config("pv", settings, steps=4, **cfg), checkpoint_dir=tmp_path / "ck",
                   progress=False)
    assert rep["seconds"] is None and rep["seconds_this_call"] > 0 and read_meta(tmp_path / "ck")["seconds"] is None
    assert describe_seconds(rep).endswith("s for steps 3-4")


@pytest.mark.parametrize("strategy", ["pv", "linearized_pv"])
def test_p_memory_moves_scalar_codes_that_single_p_steps_leave(strategy):
    """On a scalar grid an update of p_lr rarely crosses a rounding midpoint in one step; carrying what
    rounding left out adds the updates up until it does."""
    teacher, student = calibrated("llama", fmt="int2g16")
    changed = {}
    for memory in (0.0, 1.0):
        s = copy.deepcopy(student)
        cfg = ft_config(strategy, {"p_lr": 2e-3, "p_fraction": 0.05, "p_memory": memory}, steps=8, batch_size=4, seed=0)
        changed[memory] = sum(finetune(s, teacher, SEQS, cfg, progress=False)["codes_changed"])
    assert changed[1.0] > 2 * changed[0.0] + 10, changed


class _Interrupt(Exception):
    pass


def test_cosine_lamb_run_interrupted_and_resumed_equals_uninterrupted_run(tmp_path):
    teacher, student = calibrated("llama")
    cfg = ft_config("pv", {"p_lr": 3e-3, "p_fraction": 0.05}, steps=6, batch_size=4, lr=1e-3, checkpoint_every=3, seed=3, lr_schedule="cosine", v_optimizer="lamb")
    whole = copy.deepcopy(student)
    rep_whole = finetune(whole, teacher, SEQS, cfg, progress=False)

    def stop_at_4(step, loss):
        if step == 3:  # the checkpoint of step 3 is on disk; the 4th step's update is lost with the process
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(copy.deepcopy(student), teacher, SEQS, cfg, checkpoint_dir=tmp_path / "ck", progress=False,
                 on_step=stop_at_4)
    resumed = copy.deepcopy(student)
    rep = finetune(resumed, teacher, SEQS, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert rep["losses"] == pytest.approx(rep_whole["losses"], rel=1e-5)
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n


def test_lamb_moves_each_tensor_by_lr_times_its_norm():
    gen = torch.Generator().manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(50, generator=gen) * 10), torch.nn.Parameter(torch.randn(7, 3, generator=gen) * 0.01)
    before = [big.detach().clone(), small.detach().clone()]
    opt = Lamb([big, small], lr=1e-2)
    (big.sum() ** 2 + (small ** 3).sum()).backward()
    opt.step()
    for p, p0 in zip((big, small), before):
        assert float((p.detach() - p0).norm() / p0.norm()) == pytest.approx(1e-2, rel=1e-4)


def test_lamb_multi_tensor_step_equals_the_tensor_by_tensor_rule():
    """The foreach implementation is the LAMB rule applied to each tensor on its own, exactly (on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(576,), (256, 8), (96, 1), (3, 40, 8), (7,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[-1].zero_()  # a zero tensor moves by lr * r (no trust ratio)
    ref = [p.clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ref]
    opt, lr, (b1, b2), eps = Lamb(params, lr=1e-3), 1e-3, (0.9, 0.95), 1e-8
    for t in range(1, 5):
        for p, q in zip(params, ref):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.clone()
        opt.step()
        for q, (m, v) in zip(ref, moments):
            m.lerp_(q.grad, 1 - b1)
            v.mul_(b2).addcmul_(q.grad, q.grad, value=1 - b2)
            r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
            trust = q.norm() / r.norm() if q.norm() > 0 and r.norm() > 0 else torch.tensor(1.0)
            q.sub_(lr * trust * r)
    assert all(torch.equal(p, q) for p, q in zip(params, ref))


def test_cosine_schedule_starts_at_full_step_and_decays_towards_zero():
    factors = [lr_factor("cosine", k, 100) for k in range(100)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:])) and 0 < factors[-1] < 1e-3
    assert lr_factor("constant", 99, 100) == 1.0
    with pytest.raises(FinetuneError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="linear").validate()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher, student = calibrated("llama")
    cfg = ft_config("pv", steps=2, batch_size=4, checkpoint_every=1)
    finetune(student, teacher, SEQS, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    good = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in student.named_parameters() if n.endswith("codebooks")).fill_(float("nan"))
    with pytest.raises(FinetuneError, match=r"loss became nan at step 0: stopped; the last good checkpoint \(step 2\) is kept in"):
        finetune(student, teacher, SEQS, ft_config("pv", steps=4, batch_size=4, checkpoint_every=1),
                 checkpoint_dir=tmp_path / "ck", resume=False, progress=False)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == good


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    teacher, student = calibrated("llama")
    with torch.no_grad():
        next(p for n, p in student.named_parameters() if n.endswith("codebooks")).fill_(float("nan"))
    with pytest.raises(FinetuneError, match="no checkpoint had been written yet"):
        finetune(student, teacher, SEQS, ft_config("pv", steps=4, batch_size=4, checkpoint_every=1),
                 checkpoint_dir=tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_checkpoint_round_trip_restores_the_same_model(tmp_path):
    teacher, student = calibrated("mistral", "2x5g4")
    d = tmp_path / "model"
    teacher.save_pretrained(d)
    save_checkpoint(tmp_path / "ck", student, {"base_model": str(d)})
    loaded, meta, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.allclose(loaded(SEQS[:2]).logits, student(SEQS[:2]).logits, atol=1e-5)
    assert set(meta["quantized_layers"].values()) == {"2x5g4"}


def test_unknown_strategy_is_rejected():
    with pytest.raises(FinetuneError, match="unknown strategy"):
        FinetuneConfig(strategy="magic").validate()
    from llm.strategies import strategy_names

    assert {"continuous", "ste", "stochastic", "linearized_pv", "pv"} <= set(strategy_names())


def test_formats_of_about_one_bit_get_ten_times_larger_p_steps():
    from llm.formats import QuantFormat
    from llm.strategies import settings_for

    def tuned(strategy, fmt):
        return settings_for(strategy, QuantFormat.parse(fmt))

    assert tuned("pv", "2x8g8") == tuned("pv", "1x16g8") == settings_for("pv")  # 2 bits: the defaults
    assert tuned("pv", "1x8g8").p_lr == 10 * tuned("pv", "2x8g8").p_lr
    assert tuned("ste", "1x8g8").p_lr > tuned("ste", "2x8g8").p_lr
    assert tuned("pv", "1x8g8").p_fraction == tuned("pv", "2x8g8").p_fraction


def test_scalar_formats_get_pv_with_memory_whatever_the_presets_step():
    from llm.pipeline import strategy_config
    from llm.presets import preset_for, preset_strategy_settings
    from llm.strategies import settings_for

    default_fraction = settings_for("pv").p_fraction
    for fmt, beta1 in (("int2g128", 0.0), ("int1g64", 0.9)):
        preset = preset_strategy_settings(preset_for("2x8g8", "2x8g8"), fmt)  # the 2x8g8 preset run on a scalar grid
        pv = strategy_config(FinetuneConfig(), "pv", fmt, preset.get("pv")).settings
        assert (pv.p_memory, pv.p_select, pv.p_lr, pv.p_fraction, pv.p_beta1) == (1.0, "gain", 1e-3, default_fraction, beta1)
    assert strategy_config(FinetuneConfig(), "ste", "int2g128").settings == settings_for("ste")
    assert strategy_config(FinetuneConfig(), "ste", "int1g64").settings.p_lr == 1e-3
    codebooks = strategy_config(FinetuneConfig(), "pv", "2x8g8", preset_strategy_settings(preset_for("2x8g8"), "2x8g8")["pv"])
    assert codebooks.settings.p_lr == 0.03 and codebooks.settings.p_memory == 0
    assert strategy_config(FinetuneConfig(), "pv", "vq8g4").settings.p_memory == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("metric", ["euclidean", "adam"])
def test_gain_selection_moves_at_most_p_fraction_of_groups_each_closer_to_the_target(seed, metric):
    from torch import nn

    from llm.finetune import layer_pv_for
    from llm.formats import AQLMLinear, QuantFormat

    gen = torch.Generator().manual_seed(seed)
    layer = AQLMLinear(32, 16, QuantFormat.parse("1x4g4"))
    with torch.no_grad():
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=gen))
        layer.scales.copy_(torch.rand(16, generator=gen) + 0.5)
        layer.set_codes(torch.randint(0, 16, layer.codes.shape, generator=gen))
    cfg = ft_config("pv", {"p_select": "gain", "p_fraction": 0.1, "p_lr": 1.0, "p_metric": metric}).validate()
    step = layer_pv_for(nn.Sequential(layer), cfg)
    W, old = layer.weight().detach().clone(), layer.codes_view().clone()
    g = torch.randn(W.shape, generator=gen)
    layer.weight_grad = g
    changed = step.step()
    # the first step's Adam-normalized update is p_lr * g / (|g| + eps); the metric is |g| + eps (adam) or 1
    target = W - cfg.settings.p_lr * g / (g.abs() + 1e-8)
    P = g.abs() + 1e-8 if metric == "adam" else torch.ones_like(g)
    moved = (layer.codes_view() != old).any(1)
    assert 0 < changed == int(moved.sum()) <= math.ceil(cfg.settings.p_fraction * old.shape[0])
    err = lambda w: (((w - target) ** 2) * P).reshape(-1, 4).sum(1)
    assert (err(layer.weight().detach())[moved] < err(W)[moved]).all()
    assert torch.equal(layer.codes_view()[~moved], old[~moved])


def test_chunked_kl_has_the_value_and_gradients_of_the_full_kl():
    from llm.finetune import chunked_kl_loss, kl_loss

    teacher, student = calibrated("llama")
    ids = SEQS[:3]
    grads = []
    for chunk in (None, 7):  # 96 tokens in chunks of 7: the last chunk is short
        student.zero_grad()
        if chunk is None:
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            loss = kl_loss(student(input_ids=ids).logits, t)
        else:
            loss = chunked_kl_loss(student, teacher, ids, chunk)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (full, g_full), (chunked, g_chunked) = grads
    assert torch.allclose(full, chunked, rtol=1e-5)
    assert len(g_full) == len(g_chunked) > 0
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * a.abs().max()), (a - b).abs().max() / a.abs().max()


@pytest.mark.parametrize("strategy", ["pv", "ste"])
def test_p_warmup_changes_no_code_until_the_moments_have_averaged(strategy):
    teacher, student = calibrated("llama")
    cfg = ft_config(strategy, {"p_lr": 3e-2, "p_fraction": 0.05, "p_warmup": 3}, steps=5, batch_size=4)
    rep = finetune(student, teacher, SEQS, cfg, progress=False)
    assert rep["codes_changed"][:3] == [0, 0, 0]
    assert sum(rep["codes_changed"][3:]) > 0


def test_a_run_no_longer_than_its_p_warmup_says_that_no_code_will_change():
    teacher, student = calibrated("llama")
    cfg = ft_config("pv", {"p_lr": 3e-2, "p_fraction": 0.05, "p_warmup": 2}, steps=2, batch_size=4)
    with pytest.warns(UserWarning, match="no code will change"):
        rep = finetune(student, teacher, SEQS, cfg, progress=False)
    assert rep["codes_changed"] == [0, 0]
    # continuous-only changes no code whatever its warm-up, also with a V step of its own: nothing to say
    from pvtheory.v_steps import gradient_v_step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(student, teacher, SEQS, replace(cfg, strategy="continuous", settings=None), progress=False,
                 v_step=gradient_v_step(1e-3))
    assert not any("no code will change" in str(w.message) for w in caught)


@pytest.mark.parametrize("strategy", ["pv", "ste", "stochastic"])
@pytest.mark.parametrize("micro", [None, 2])
def test_p_steps_taken_during_backward_give_the_codes_of_p_steps_at_the_end(strategy, micro):
    teacher, student = calibrated("llama")
    runs = []
    for in_backward in (True, False):
        s = copy.deepcopy(student)
        cfg = ft_config(strategy, {"p_lr": 1e-2, "p_fraction": 0.05}, steps=4, batch_size=4, micro_batch_size=micro, lr=1e-3, p_step_in_backward=in_backward)
        rep = finetune(s, teacher, SEQS, cfg, progress=False)
        runs.append((rep, {n: b.clone() for n, b in s.named_buffers() if n.endswith("codes")}))
    (a, codes_a), (b, codes_b) = runs
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6) and a["codes_changed"] == b["codes_changed"]
    assert sum(a["codes_changed"]) > 0 and all(torch.equal(codes_a[n], codes_b[n]) for n in codes_a)
