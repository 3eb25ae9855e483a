import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_openai


@pytest.fixture
def write_problem(tmp_path):
    """Writes a KernelBench-format file and returns its path."""
    def write(body: str, name: str = "problem.py") -> Path:
        path = tmp_path / name
        path.write_text("import torch\nimport torch.nn as nn\n" + body)
        return path
    return write
