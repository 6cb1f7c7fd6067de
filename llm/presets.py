"""The best known recipe per format: what `pvtuning pipeline MODEL --format F` runs with no other flag.

Each preset fixes the calibration and fine-tuning settings that gave the published result (validation
perplexity at 512 tokens, reference models, one GPU); explicit flags override single entries. Formats
without a preset of their own use DEFAULT. The P step's per-strategy settings come on top
(llm.pipeline.tuned_strategy_settings, by the format's bits).
"""
from __future__ import annotations

# calibration (CalibrationConfig fields) + fine-tuning (FinetuneConfig fields) + the PV override
DEFAULT = {
    "rounds": 12, "tolerance": 0.002, "block_tune_steps": 1000,
    "steps": 200, "batch_size_ft": 64, "micro_batch_size": 64, "v_optimizer": "lamb", "lr": 1e-3,
}

PRESETS = {
    # ref-llama: calibrated 17.59, PV-Tuning 17.04 (original 16.54); ref-mistral: 17.94 -> 17.24
    "2x8g8": dict(DEFAULT, block_tune_steps=500, steps=260, batch_size_ft=128, pv_p_lr=0.03),
    # ref-llama: calibrated 23.78, PV-Tuning 19.15; ref-mistral: 25.79 -> 19.83
    "1x8g8": dict(DEFAULT, steps=220, batch_size_ft=64),
}

MEASURED = {
    "2x8g8": "ref-llama 16.54 -> 17.04 (PV), ref-mistral 16.63 -> 17.24",
    "1x8g8": "ref-llama 16.54 -> 19.15 (PV), ref-mistral 16.63 -> 19.83",
}


def preset_for(fmt: str, name: str = "auto") -> dict:
    """The settings of preset `name` ("auto": the format's own preset, or DEFAULT)."""
    if name == "auto":
        return dict(PRESETS.get(fmt, DEFAULT))
    if name == "default":
        return dict(DEFAULT)
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose auto, default or one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def describe() -> str:
    """One line per preset for --help: its settings and the result they gave."""
    lines = []
    for name, p in PRESETS.items():
        lines.append(f"  {name}: {p['steps']} steps x {p['batch_size_ft']} sequences, calibration "
                     f"{p['block_tune_steps']} block-tuning steps; measured {MEASURED[name]}")
    lines.append(f"  default (other formats): {DEFAULT['steps']} steps x {DEFAULT['batch_size_ft']} sequences")
    return "\n".join(lines)
