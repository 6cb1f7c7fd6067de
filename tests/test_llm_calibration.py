"""Calibration: the P step with an exact V step never increases the layer objective."""
import torch
from hypothesis import given, settings, strategies as st

from llm.aqlm import exact_codebooks, exact_layer_values, hessian_code_sweep
from llm.calibrate import CalibrationConfig, calibrate, quantize_linear
from llm.layer_objective import damped, relative_error
from llm.formats import QuantFormat
from tests_llm_common import layer_problem
from llm_helpers import tiny_model


@settings(max_examples=10)
@given(st.integers(0, 999), st.sampled_from(["1x4g4", "2x4g4", "1x6g8", "2x3g2"]))
def test_code_sweep_and_exact_layer_values_never_increase_the_layer_objective(seed, fmt):
    linear, H = layer_problem(seed)
    layer, errs = quantize_linear(linear, H, QuantFormat.parse(fmt), CalibrationConfig(fmt=fmt, rounds=3))
    assert all(b <= a + 1e-5 * a for a, b in zip(errs, errs[1:])), errs
    W, Hd = linear.weight.detach(), damped(H, 1e-2)
    before = float(relative_error(layer.weight().detach(), W, Hd))
    hessian_code_sweep(layer, W, Hd, beam_width=4)
    mid = float(relative_error(layer.weight().detach(), W, Hd))
    exact_layer_values(layer, W, Hd)
    after = float(relative_error(layer.weight().detach(), W, Hd))
    assert mid <= before * (1 + 1e-5) and after <= mid * (1 + 1e-5)


def test_exact_codebooks_leave_zero_gradient():
    linear, H = layer_problem(3)
    layer, _ = quantize_linear(linear, H, QuantFormat.parse("2x4g4"), CalibrationConfig(fmt="2x4g4", rounds=1))
    W, Hd = linear.weight.detach(), damped(H, 1e-2)
    exact_codebooks(layer, W, Hd)
    D = layer.weight() - W
    ((D @ Hd) * D).sum().backward()
    scale = float(((W @ Hd) * W).sum())
    assert float(layer.codebooks.grad.abs().max()) <= 1e-4 * scale


def test_gptq_beats_round_to_nearest():
    linear, H = layer_problem(5)
    fmt = QuantFormat.parse("int3g16")
    layer, errs = quantize_linear(linear, H, fmt, CalibrationConfig(fmt="int3g16", adam_v_iters=0))
    W, Hd = linear.weight.detach(), damped(H, 1e-2)
    layer.set_codes(layer.encode(W))  # round to nearest on the same grid
    assert errs[0] < float(relative_error(layer.weight().detach(), W, Hd))


def test_calibrated_tiny_llama_and_mistral_stay_close_to_the_original():
    for arch in ("llama", "mistral"):
        model = tiny_model(arch, peaky=False)
        seqs = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(seqs).logits
        report = calibrate(model, seqs, CalibrationConfig(fmt="2x6g8", rounds=2, forward_batch_size=4, block_tune_steps=0), progress=False)
        with torch.no_grad():
            out = model(seqs).logits
        assert float((out - ref).norm() / ref.norm()) < 0.3
        assert len(report["layers"]) == 2 * 7
        phases = report["phase_seconds"]  # where the time went: each phase once, within the total
        assert {"hessians", "init", "p_step", "v_step", "block_outputs"} <= set(phases) and phases["cg_iterations"] > 0
        assert sum(v for k, v in phases.items() if k != "cg_iterations") <= report["seconds"] + 0.1


def _tuning_report(**kw) -> dict:
    model = tiny_model("llama", peaky=False)
    seqs = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = CalibrationConfig(fmt="1x6g8", rounds=1, forward_batch_size=4, block_tune_lr=1e-3, **kw)
    return calibrate(model, seqs, cfg, progress=False)


def test_block_tuning_lowers_the_block_output_error():
    for fraction in (0.0, 0.05):  # continuous only, and PV (codes move too)
        report = _tuning_report(block_tune_steps=30, block_tune_p_fraction=fraction)
        for block in report["blocks"]:
            first, last = block["tune_losses_first_last"]
            assert last < first


def test_true_sequential_quantizes_in_reading_order():
    from llm.calibrate import sequential_groups
    from llm.model import BLOCK_LINEARS

    groups = sequential_groups(BLOCK_LINEARS, True)
    assert [len(g) for g in groups] == [3, 1, 2, 1] and sorted(sum(groups, [])) == sorted(BLOCK_LINEARS)
    assert sequential_groups(BLOCK_LINEARS, False) == [list(BLOCK_LINEARS)]
    report = _tuning_report(block_tune_steps=0, true_sequential=True)
    assert [l["name"].split(".", 3)[-1] for l in report["layers"][:7]] == sum(groups, [])


def test_original_targets_measure_each_block_against_the_unquantized_model():
    import copy

    seqs = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(5))
    teacher = tiny_model("llama", layers=3)
    student = copy.deepcopy(teacher)
    cfg = CalibrationConfig(fmt="1x6g8", rounds=1, forward_batch_size=8, block_tune_steps=0, original_targets=True)
    report = calibrate(student, seqs, cfg, progress=False)
    with torch.no_grad():
        hs_t = teacher(input_ids=seqs, output_hidden_states=True).hidden_states
        hs_s = student(input_ids=seqs, output_hidden_states=True).hidden_states
    for i, block in enumerate(report["blocks"][:-1]):  # the last hidden state has the final norm applied
        expected = float(((hs_s[i + 1] - hs_t[i + 1]) ** 2).mean())
        assert abs(block["output_mse"] - expected) <= 1e-4 * expected + 1e-9, (i, block["output_mse"], expected)
