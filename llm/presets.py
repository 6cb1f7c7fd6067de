"""The best known recipe per format: what `pvtuning pipeline MODEL --format F` runs with no other flag.

A preset fixes calibration settings (CalibrationConfig fields and the number of calibration sequences) and
fine-tuning settings (FinetuneConfig fields) that gave the published result (validation perplexity at 512 tokens,
one GPU), and may set strategy settings for its batch (`strategy_settings`, on codebook formats only: the scalar
grid's P step has its own tuning). Explicit flags override single entries. Format presets (the reference models,
docs/results.md) are found by the parsed format, so vq8g8 gets 1x8g8's; formats without a preset of their own use
DEFAULT. A model preset (`--preset smollm2`, docs/results_smollm2.md) holds one recipe per format, measured on that
model. Each strategy's tuned settings for the format come first (llm.strategies).
"""
from __future__ import annotations

from llm.formats import QuantFormat

DEFAULT = {
    "nsamples": 1024, "rounds": 12, "tolerance": 0.002, "block_tune_steps": 1000,
    "steps": 200, "batch_size": 64, "micro_batch_size": 64, "v_optimizer": "lamb", "lr": 1e-3,
}

PRESETS = {
    # ref-llama: calibrated 17.59, PV-Tuning 17.04 (original 16.54); ref-mistral: 17.94 -> 17.24
    "2x8g8": dict(DEFAULT, block_tune_steps=500, steps=260, batch_size=128, strategy_settings={"pv": {"p_lr": 0.03}}),
    # ref-llama: calibrated 23.78, PV-Tuning 19.15; ref-mistral: 25.79 -> 19.83
    "1x8g8": dict(DEFAULT, steps=220, batch_size=64),
}

MEASURED = {
    "2x8g8": "ref-llama 16.54 -> 17.04 (PV), ref-mistral 16.63 -> 17.24",
    "1x8g8": "ref-llama 16.54 -> 19.15 (PV), ref-mistral 16.63 -> 19.83",
}


# SmolLM2-135M, a real pretrained model: its longest measured budget per format (one H100; each whole pipeline well
# within 20 minutes). 2x8g8: calibrated 34.82, PV-Tuning 18.76 (original 16.02); 1x8g8: 175.3 -> STE 31.12, PV 31.47
MODEL_PRESETS = {
    "smollm2": {
        "2x8g8": dict(DEFAULT, nsamples=512, rounds=4, block_tune_steps=100, steps=280, batch_size=64,
                      strategy_settings={"pv": {"p_lr": 0.03}}),
        "1x8g8": dict(DEFAULT, nsamples=512, block_tune_steps=100, steps=250, batch_size=64,
                      strategy_settings={"pv": {"p_lr": 0.01, "p_beta1": 0.9}}),
    },
}

MODEL_MEASURED = {
    "smollm2": {"2x8g8": "SmolLM2-135M 16.02 -> 18.76 (PV, 8.4 min on one H100)",
                "1x8g8": "SmolLM2-135M 16.02 -> 31.12 (STE), 31.47 (PV), 8.4 min on one H100"},
}


def preset_names() -> list:
    """Every name --preset takes."""
    return ["auto", "default", *PRESETS, *MODEL_PRESETS]


def preset_for(fmt: str, name: str = "auto") -> dict:
    """The settings of preset `name` ("auto": the parsed format's own preset, or DEFAULT; a model preset: its
    recipe for this format)."""
    parsed = str(QuantFormat.parse(fmt))
    if name == "auto":
        return dict(PRESETS.get(parsed, DEFAULT))
    if name == "default":
        return dict(DEFAULT)
    if name in MODEL_PRESETS:
        recipes = MODEL_PRESETS[name]
        if parsed not in recipes:
            raise ValueError(f"--preset {name} has recipes for {', '.join(recipes)} only, not {fmt}: "
                             "choose one of them, or --preset auto")
        return dict(recipes[parsed])
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {', '.join(preset_names())}")
    return dict(PRESETS[name])


def preset_strategy_settings(preset: dict, fmt: str) -> dict:
    """{strategy: {setting: value}} a preset sets, for this format (codebook formats only)."""
    return preset.get("strategy_settings", {}) if QuantFormat.parse(fmt).kind == "aqlm" else {}


def describe() -> str:
    """One line per preset for --help: its settings and the result they gave."""
    lines = []
    for name, p in PRESETS.items():
        lines.append(f"  {name}: {p['steps']} steps x {p['batch_size']} sequences, calibration "
                     f"{p['block_tune_steps']} block-tuning steps; measured {MEASURED[name]}")
    for name, recipes in MODEL_PRESETS.items():
        for fmt, p in recipes.items():
            lines.append(f"  {name} ({fmt}): {p['nsamples']} calibration sequences, {p['rounds']} rounds, "
                         f"{p['block_tune_steps']} block-tuning steps, {p['steps']} steps x {p['batch_size']} sequences; "
                         f"measured {MODEL_MEASURED[name][fmt]}")
    lines.append(f"  default (other formats): {DEFAULT['steps']} steps x {DEFAULT['batch_size']} sequences")
    return "\n".join(lines)
