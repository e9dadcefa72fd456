"""The README's blocks marked ``<!-- runnable -->`` run as written, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(),
                    re.DOTALL)


def test_the_readme_has_runnable_blocks():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_runnable_readme_block_runs_as_written(code):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
