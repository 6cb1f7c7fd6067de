"""Export to the Hugging Face AQLM format: transformers + aqlm load it and give our logits."""
import copy

import pytest
import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.export import ExportError, export_aqlm
from llm_helpers import tiny_model


@pytest.mark.parametrize("fmt", ["2x8g8", "1x8g8"])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, fmt):
    pytest.importorskip("aqlm", reason="loading the AQLM format needs the aqlm package (pip install 'aqlm[cpu]')")
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama", peaky=False)
    base.save_pretrained(tmp_path / "base")
    seqs = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(base)
    calibrate(q, seqs, CalibrationConfig(fmt=fmt, rounds=1, batch_size=2, block_tune_steps=0), progress=False)
    out = export_aqlm(q, tmp_path / "base", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    with torch.no_grad():
        ours, theirs = q(seqs).logits, hf(seqs).logits
        one_ours, one_theirs = q(seqs[:1, :3]).logits, hf(seqs[:1, :3]).logits  # the gemv path too
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.allclose(one_ours, one_theirs, atol=1e-4, rtol=1e-4)


def test_scalar_models_cannot_be_exported_to_aqlm(tmp_path):
    base = tiny_model("llama", peaky=False)
    base.save_pretrained(tmp_path / "base")
    q = copy.deepcopy(base)
    calibrate(q, torch.randint(0, 256, (2, 16)), CalibrationConfig(fmt="int2g16", batch_size=2, v_steps=0, block_tune_steps=0), progress=False)
    with pytest.raises(ExportError, match="scalar layers cannot"):
        export_aqlm(q, tmp_path / "base", tmp_path / "hf")
