"""The examples stay runnable and show what they claim."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_loop_example_trains_and_moves_indices():
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_loop.py"), "--steps", "60"],
                            capture_output=True, text=True, check=True, timeout=300)
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert "reselected" in result.stdout
    assert losses[-1] < 0.85 * losses[0], result.stdout
    moved = int(re.search(r"(\d+) of \d+ index slots differ", result.stdout).group(1))
    assert moved > 0
