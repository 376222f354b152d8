"""The LoRA example in examples/ runs end to end (demo model, a few steps) and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "lora_finetune.py"


def test_lora_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("lora_finetune", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--steps", "12", "--seq", "48", "--out", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert "int8 codes unchanged: True" in out
    assert "optimizer: AdamW8bit" in out
    assert "reloaded outputs identical: True" in out
    before = float(out.split("held-out loss before:")[1].split()[0])
    after = float(out.split("held-out loss after:")[1].split()[0])
    assert after < before - 0.3, out
    assert rc == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
