"""Test-wide setup.

huggingface_hub reads HF_HUB_DISABLE_XET, HF_HOME and friends when it is first
imported, so they are set here, before any test module imports it. Tests never
reach the real Hub: the Hub-compatible server in tests/hubserver.py stands in.
"""

import os
import sys
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="int8-tests-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = _HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # unreachable unless a test starts the local server
os.environ.pop("HF_TOKEN", None)
os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["hubserver"]
