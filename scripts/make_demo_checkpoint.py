"""Build the demo's source checkpoint: a small GPT-J (4 layers, width 512, ~50 MB of FP32)
with random weights plus outliers, a byte-level tokenizer, written as transformers would.

Usage: python scripts/make_demo_checkpoint.py FOLDER
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import make_tiny  # noqa: E402  (the test suite's checkpoint factory)

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "demo/tiny-gptj")
if (folder / "model.safetensors").exists():
    print(f"{folder} exists")
else:
    shutil.rmtree(folder, ignore_errors=True)
    make_tiny("gptj", folder, n_embd=512, n_layer=4, n_head=8, rotary_dim=32)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"built {folder} ({size / 1e6:.0f} MB, FP32 GPT-J, 4 layers)")
