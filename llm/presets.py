"""The best known recipe per format: what `pvtuning pipeline MODEL --format F` runs with no other flag.

A preset fixes calibration settings (CalibrationConfig fields) and fine-tuning settings (FinetuneConfig fields)
that gave the published result (validation perplexity at 512 tokens, reference models, one GPU), and may set
strategy settings for its batch (`strategy_settings`, on codebook formats only: the scalar grid's P step has its
own tuning). Explicit flags override single entries. Presets are found by the parsed format, so vq8g8 gets
1x8g8's; formats without a preset of their own use DEFAULT. Each strategy's tuned settings for the format come
first (llm.strategies); the measurements: docs/results.md.
"""
from __future__ import annotations

from llm.formats import QuantFormat

DEFAULT = {
    "rounds": 12, "tolerance": 0.002, "block_tune_steps": 1000,
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


def preset_for(fmt: str, name: str = "auto") -> dict:
    """The settings of preset `name` ("auto": the parsed format's own preset, or DEFAULT)."""
    if name == "auto":
        return dict(PRESETS.get(str(QuantFormat.parse(fmt)), DEFAULT))
    if name == "default":
        return dict(DEFAULT)
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose auto, default or one of {', '.join(PRESETS)}")
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
    lines.append(f"  default (other formats): {DEFAULT['steps']} steps x {DEFAULT['batch_size']} sequences")
    return "\n".join(lines)
