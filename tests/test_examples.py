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


def test_classify_example_learns_the_task_and_reloads_the_same_classifier():
    result = subprocess.run([sys.executable, str(EXAMPLES / "classify.py")],
                            capture_output=True, text=True, check=True, timeout=300)
    before = float(re.search(r"accuracy before: (\d\.\d+)", result.stdout).group(1))
    after = float(re.search(r"accuracy after: (\d\.\d+)", result.stdout).group(1))
    assert before < 0.5 < 0.9 < after, result.stdout  # three labels: chance is 1/3
    assert "3 labels, same predictions: True" in result.stdout
