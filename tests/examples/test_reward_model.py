"""examples/reward_model.py: the learned reward model, and the example run end to end."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep.controller.rewards import arithmetic

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reward_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("reward_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_trained_model_scores_batches_like_the_task_reward(tmp_path):
    example = load_example()
    model = example.RewardModel(example.train_reward_model(str(tmp_path / "rm.pt")))
    prompts, completions, answers = [], [], []
    for a in range(5):
        for b in range(5):
            answer = str(a + b)
            for completion in [answer, str(a + b + 1), str(a + b + 6), answer + "=", "", "+", "12", " " + answer]:
                prompts.append(f"{a}+{b}=")
                completions.append(completion)
                answers.append(answer)
    scores = model(prompts, completions)  # one batch of 200
    truth = [arithmetic(p, c, a) for p, c, a in zip(prompts, completions, answers)]
    assert len(scores) == len(truth) and all(isinstance(s, float) for s in scores)
    errors = sorted(abs(s - t) for s, t in zip(scores, truth))
    assert errors[len(errors) // 2] < 0.02 and errors[-1] < 0.25, errors[-5:]
    # within each prompt, the exact answer scores highest
    for i in range(0, len(scores), 8):
        assert max(range(8), key=lambda k: scores[i + k]) in (0, 7)  # "7" and " 7" are both exact


@pytest.mark.slow
def test_the_example_trains_with_its_reward_model_under_the_strict_barrier(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "2", "--dir", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert re.search(r"mean \|error\| 0\.0\d+ on held-out pairs", out), out[-3000:]
    loads = re.findall(rf"reward model loaded from {re.escape(str(tmp_path))}/reward_model.pt \(pid (\d+)\)", out)
    assert len(loads) == 2 and len(set(loads)) == 2  # once on each of local-cpu's 2 reward procs
    assert "differing tokens per step: [0, 0]" in out
    assert len(re.findall(r"^step +\d+ \|.*\| diff_tok 0 \|", out, re.MULTILINE)) == 2
