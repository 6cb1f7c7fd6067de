"""One P-step / V-step interface at both scales: a step written here, against pvtheory only, runs on a
toy problem through pvtheory.pv and in LLM fine-tuning, with no code in llm/ that knows about it."""
import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.checkpoint import flatten_state, unflatten_state
from llm.finetune import FinetuneConfig, finetune
from llm.formats import AQLMLinear, QuantFormat
from llm.strategies import _REGISTRY, NoSettings, PVSettings, adam_preconditioner, register_strategy
from llm_helpers import ft_config, tiny_corpus, tiny_model, tiny_model_dir
from pvtheory import scalar, exact_p_step, exact_v_step, init_scalar, linearized_p_step, pv, random_problem, subspace_p_step
from pvtheory.baselines import continuous_optimum
from pvtheory.objectives import LocalQuadraticModel, ObservedGradient
from pvtheory.p_steps import exact_p_by_separable
from pvtheory.preconditioners import adam_preconditioned
from pvtheory.steps import Step, point, stateless

SEQS = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(1))


# --- a P step and a V step a researcher might write, against pvtheory's interface only ----------
def largest_entry_p_step(tau: float) -> Step:
    """Greedy subspace P step that ranks groups by the largest single entry of grad_G / D_G (not by
    the norm, as pvtheory's subspace step does), then re-encodes them towards x - grad / D."""

    def update(param, objective):
        x = point(param)
        grad = objective.grad(x)
        D = objective.curvature()
        step = grad / D if isinstance(D, torch.Tensor) else grad / objective.group_smoothness(param.group_size).repeat_interleave(param.group_size)
        scores = step.reshape(-1, param.group_size).abs().amax(1)
        S = torch.topk(scores, max(1, math.ceil(tau * param.num_groups))).indices
        coords = param.group_coordinates(S)
        D_S = objective.curvature(coords)
        target = x.clone()
        target[coords] = x[coords] - grad[coords] / D_S
        return param.with_codes(param.encode(target.reshape(param.shape), groups=S))

    return stateless("largest-entry subspace P", update)


def sign_v_step(lr: float) -> Step:
    """signSGD on V: every value moves by lr against the sign of its gradient."""

    def update(param, objective):
        values = [v.detach().clone().requires_grad_(True) for v in param.values]
        with torch.enable_grad():
            x = param.with_value_tuple(values).decode()
            x.backward(objective.grad(point(param)).reshape(x.shape))
        return param.with_value_tuple([v.detach() - lr * v.grad.sign() for v in values])

    return stateless("sign V", update)


@pytest.fixture
def registered():
    """Register strategies for one test; the registry is left as it was."""
    names = []

    def register(name, build, settings=None):
        register_strategy(name, build, settings or NoSettings)
        names.append(name)

    yield register
    for n in names:
        _REGISTRY.pop(n, None)


def calibrated(fmt="1x6g8"):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    calibrate(student, SEQS, CalibrationConfig(fmt=fmt, rounds=1, forward_batch_size=8, block_tune_steps=0), progress=False)
    return teacher, student


@pytest.mark.parametrize("seed", range(3))
def test_a_user_p_step_never_increases_phi_on_least_squares_through_pvtheory_pv(seed):
    phi = random_problem("least_squares", d=24, seed=seed)
    x0 = init_scalar(torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), 4)
    result = pv(phi, x0, largest_entry_p_step(0.2), exact_v_step(), max_iters=60)
    phis = result.phis()
    assert (phis[1:] <= phis[:-1] + 1e-9 * (1 + abs(phis[:-1]))).all()
    assert result.changed().sum() > 0 and phis[-1] < phis[0]


@pytest.mark.parametrize("fmt", ["1x6g8", "int2g16"])
def test_a_user_p_step_fine_tunes_an_llm_by_name(registered, fmt):
    registered("largest_entry", lambda s, ctx: adam_preconditioner(s, largest_entry_p_step(s.p_fraction), ctx), PVSettings)
    teacher, student = calibrated(fmt)
    before = {n: b.clone() for n, b in student.named_buffers() if n.endswith("codes")}
    cfg = ft_config("largest_entry", {"p_lr": 3e-3, "p_fraction": 0.02}, steps=20, batch_size=8, lr=3e-3)
    rep = finetune(student, teacher, SEQS, cfg, progress=False)
    groups = sum(b.numel() // (b.shape[-1] if fmt != "int2g16" else 1) for b in before.values())
    n_layers = len(before)
    # at most ceil(p_fraction * groups) per layer and step
    assert 0 < max(rep["codes_changed"]) <= math.ceil(cfg.settings.p_fraction * groups) + n_layers
    assert all(math.isfinite(l) for l in rep["losses"])
    if fmt == "1x6g8":  # (on the scalar grid this lr's V step alone raises the KL of the tiny model)
        assert sum(rep["losses"][-3:]) / 3 < rep["losses"][0]
    assert any(not torch.equal(before[n], b) for n, b in student.named_buffers() if n in before)


def test_a_user_v_step_trains_the_codebooks_in_llm_fine_tuning():
    teacher, student = calibrated()
    layer = next(m for m in student.modules() if isinstance(m, AQLMLinear))
    codebooks = layer.codebooks.detach().clone()
    cfg = ft_config("pv", {"p_lr": 3e-3, "p_fraction": 0.02}, steps=10, batch_size=8, lr=3e-3)
    rep = finetune(student, teacher, SEQS, cfg, progress=False, v_step=sign_v_step(1e-3))
    moved = (layer.codebooks.detach() - codebooks).abs()
    assert torch.allclose(moved.max(), torch.tensor(10e-3), rtol=1e-4)  # ten sign steps of 1e-3 at most, some made
    assert sum(rep["losses"][-3:]) / 3 < rep["losses"][0]


def test_a_user_v_step_lowers_phi_on_a_toy_problem():
    phi = random_problem("least_squares", d=16, seed=0)
    x0 = init_scalar(continuous_optimum(phi), 4)
    result = pv(phi, x0, subspace_p_step(2), sign_v_step(1e-3), max_iters=20)
    assert result.phis()[-1] < result.phis()[0]


def test_a_strategy_from_an_imported_module_runs_in_the_cli_pipeline(tmp_path):
    from llm.cli import main

    plugin = tmp_path / "my_strategies.py"
    plugin.write_text(
        "from llm.strategies import PStepSettings, adam_preconditioner, register_strategy\n"
        "from pvtheory import linearized_p_step\n"
        "register_strategy('plugin_linearized', lambda s, ctx: adam_preconditioner(s, linearized_p_step(), ctx),"
        " PStepSettings, replace=True)\n")
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    args = ["pipeline", model, "--train", train, "--validation", val, "--out", tmp_path / "run", "--format", "1x6g8",
            "--strategies", "plugin_linearized", "--import", plugin, "--steps", "2", "--nsamples", "8", "--seq-len",
            "32", "--rounds", "1", "--block-tune-steps", "0", "--ft-batch-size", "4", "--eval-windows", "2", "--device", "cpu"]
    try:
        assert main(list(map(str, args))) == 0
    finally:
        _REGISTRY.pop("plugin_linearized", None)
    assert (tmp_path / "run" / "plugin_linearized").is_dir()


PLUGIN_WITH_A_SETTING = """
from dataclasses import dataclass, field
from llm.strategies import PStepSettings, adam_preconditioner, register_strategy
from pvtheory import subspace_p_step


@dataclass
class EveryKthSettings(PStepSettings):
    group_stride: int = field(default=3, metadata={"help": "re-encode one group in this many"})

    def extra_checks(self):
        return [("group_stride", self.group_stride >= 1, ">= 1")]


def build(s, ctx):
    return adam_preconditioner(s, subspace_p_step(fraction=1.0 / s.group_stride, select="greedy"), ctx)


register_strategy("every_kth", build, EveryKthSettings, replace=True)
"""


@pytest.mark.parametrize("how", ["flag", "json"])
def test_a_plugin_strategys_own_setting_is_set_from_the_cli(tmp_path, how):
    """A plugin's settings class gets its own flag (--group-stride) and --strategy-settings key, the same name from
    flag to field to the run's JSON; a bad value is one line naming it."""
    from llm.cli import main

    plugin = tmp_path / "every_kth.py"
    plugin.write_text(PLUGIN_WITH_A_SETTING)
    model = tiny_model_dir(tmp_path)
    train, val = tiny_corpus(tmp_path)
    setting = ["--group-stride", "5"] if how == "flag" else ["--strategy-settings", '{"every_kth": {"group_stride": 5}}']
    base = ["pipeline", model, "--train", train, "--validation", val, "--format", "1x6g8", "--strategies", "every_kth",
            "--import", plugin, "--steps", "2", "--nsamples", "8", "--seq-len", "32", "--rounds", "1",
            "--block-tune-steps", "0", "--ft-batch-size", "4", "--eval-windows", "2", "--device", "cpu"]
    try:
        assert main(list(map(str, base + ["--out", tmp_path / "run"] + setting))) == 0
        stored = json.loads((tmp_path / "run" / "every_kth" / "meta.json").read_text())["finetune"]["settings"]
        assert stored["group_stride"] == 5 and stored["p_lr"] == 1e-2
        bad = ["--group-stride", "0"] if how == "flag" else ["--strategy-settings", '{"every_kth": {"group_strid": 5}}']
        assert main(list(map(str, base + ["--out", tmp_path / "run2"] + bad))) == 2
    finally:
        _REGISTRY.pop("every_kth", None)
    assert not (tmp_path / "run2").exists()


def test_an_unknown_strategy_names_the_import_option(tmp_path, capsys):
    from llm.cli import main

    assert main(["finetune", str(tmp_path), "--train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"),
                 "--strategy", "nope"]) == 2
    assert "--import" in capsys.readouterr().err


# --- the LLM strategies are pvtheory's steps ------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_linearized_pv_in_the_adam_metric_is_the_exact_p_step_of_adams_local_model(seed):
    gen = torch.Generator().manual_seed(seed)
    layer = AQLMLinear(32, 8, QuantFormat.parse("1x5g4"))
    with torch.no_grad():
        layer.codebooks.normal_(generator=gen)
        layer.scales.uniform_(0.5, 1.5, generator=gen)
        layer.set_codes(torch.randint(0, 32, layer.codes.shape, generator=gen))
    param = layer.as_param()
    x = point(param)
    model = LocalQuadraticModel(x, torch.randn(x.shape, generator=gen), torch.rand(x.shape, generator=gen) + 0.1)
    linearized, _ = linearized_p_step(metric="curvature").update(param, model, None)
    assert torch.equal(linearized.codes, exact_p_by_separable(param, model).codes)
    assert model.value(point(linearized)) <= model.value(x) + 1e-6


def test_adam_preconditioned_subspace_pv_descends_on_a_toy_problem():
    phi = random_problem("least_squares", d=32, seed=1)
    x0 = init_scalar(torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 4)
    step = adam_preconditioned(subspace_p_step(fraction=0.1, score="update", metric="curvature"), lr=0.5, beta1=0.9)
    result = pv(phi, x0, step, exact_v_step(), max_iters=40)
    assert result.phis()[-1] < result.phis()[0] and result.changed().sum() > 0


def test_the_p_step_sees_only_the_gradient_at_llm_scale():
    param = AQLMLinear(16, 4, QuantFormat.parse("1x4g4")).as_param()
    with pytest.raises(NotImplementedError, match="only its gradient"):
        exact_p_step("enumerate").update(scalar(torch.zeros(4, dtype=torch.long), torch.tensor([0.0, 1.0])),
                                         ObservedGradient(torch.zeros(4)), None)
    with pytest.raises(NotImplementedError, match="smoothness constant"):
        linearized_p_step().update(param, ObservedGradient(torch.zeros(4, 16)), None)


def test_step_states_round_trip_through_checkpoint_tensors():
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    state = {"t": 3, "v": torch.randn(4, 2), "m": None, "inner": [gen, 0.25, {"u": torch.arange(3)}]}
    back = unflatten_state(flatten_state(state, "p/model.layers.0.q_proj"), "p/model.layers.0.q_proj")
    assert back["t"] == 3 and back["m"] is None and torch.equal(back["v"], state["v"])
    assert back["inner"][1] == 0.25 and torch.equal(back["inner"][2]["u"], torch.arange(3))
    assert torch.equal(torch.rand(5, generator=back["inner"][0]), torch.rand(5, generator=gen))


@pytest.mark.parametrize("ratio", [0.05, 0.3, 10.0])
def test_trust_region_undoes_exactly_the_changes_larger_than_the_ratio(ratio):
    from pvtheory.p_steps import trust_region

    gen = torch.Generator().manual_seed(0)
    layer = AQLMLinear(32, 8, QuantFormat.parse("1x5g4"))
    with torch.no_grad():
        layer.codebooks.normal_(generator=gen)
        layer.set_codes(torch.randint(0, 32, layer.codes.shape, generator=gen))
    param = layer.as_param()
    model = ObservedGradient(torch.randn(8, 32, generator=gen))
    inner = linearized_p_step(L=1.0)
    free, _ = inner.update(param, model, None)
    kept, _ = trust_region(inner, ratio).update(param, model, None)
    x, y = param.decode().reshape(-1, 4), free.decode().reshape(-1, 4)
    small = (y - x).norm(dim=1) <= ratio * x.norm(dim=1)
    assert torch.equal(kept.codes[small], free.codes[small]) and torch.equal(kept.codes[~small], param.codes[~small])


def test_a_user_step_whose_state_is_one_tensor_resumes_exactly(tmp_path, registered):
    def momentum_sign_step(lr: float) -> Step:
        """Linearized step along a momentum of the gradient; the state is one tensor."""
        def init(param, objective):
            return torch.zeros(param.num_groups * param.group_size)

        def update(param, objective, m):
            m = 0.9 * m + objective.grad(point(param))
            return param.with_codes(param.encode((point(param) - lr * m.sign()).reshape(param.shape))), m

        return Step("momentum sign", init, update, deterministic=False)

    @dataclass
    class MomentumSignSettings:
        p_lr: float = 1e-2

        def validate(self):
            return self

    registered("momentum_sign", lambda s, ctx: momentum_sign_step(s.p_lr), MomentumSignSettings)
    teacher, student = calibrated()
    cfg = dict(strategy="momentum_sign", batch_size=4, lr=1e-3, checkpoint_every=2, seed=3)
    whole = copy.deepcopy(student)
    rep_whole = finetune(whole, teacher, SEQS, FinetuneConfig(steps=6, **cfg), progress=False)
    finetune(copy.deepcopy(student), teacher, SEQS, FinetuneConfig(steps=3, **cfg), checkpoint_dir=tmp_path / "ck",
             progress=False)
    rep = finetune(copy.deepcopy(student), teacher, SEQS, FinetuneConfig(steps=6, **cfg), checkpoint_dir=tmp_path / "ck",
                   progress=False)
    assert rep["resumed_at"] == 3 and rep["losses"] == pytest.approx(rep_whole["losses"], rel=1e-5)
    assert rep["codes_changed"] == rep_whole["codes_changed"]


def test_bfloat16_moments_are_stored_in_bfloat16_and_fine_tune(tmp_path):
    from llm.checkpoint import read_tensors

    teacher, student = calibrated()
    cfg = ft_config("pv", {"p_lr": 3e-3, "p_fraction": 0.05, "p_state_dtype": "bfloat16"}, steps=3, batch_size=4)
    rep = finetune(student, teacher, SEQS, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    state = read_tensors(tmp_path / "ck" / "state.safetensors")
    moments = [v for k, v in state.items() if k.startswith("p/") and k.endswith("/v")]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    assert all(math.isfinite(l) for l in rep["losses"])
