"""Per-step metrics: TensorBoard scalars, one console line, and the in-memory history."""

import math
import os

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

# (metric key, console label, format) for the one-line summary.
_CONSOLE = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/std", "±", "{:.3f}"),
    ("train/loss", "loss", "{:+.4f}"),
    ("barrier/num_differing_tokens", "diff_tok", "{:.0f}"),
    ("barrier/max_abs_diff", "max_diff", "{:.1e}"),
    ("barrier/kl", "kl", "{:.1e}"),
    ("perf/tokens_per_s", "tok/s", "{:.0f}"),
    ("time/step", "step_s", "{:.2f}"),
)
_PHASES = ("verify", "generate", "reward", "train", "sync")
DROPPED_PROMPTS = "data/num_dropped_prompts"  # over-long prompts the step skipped


def console_line(metrics: dict) -> str:
    parts = [f"step {metrics.get('step', '?'):>4}"]
    for key, label, fmt in _CONSOLE:
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    if metrics.get(DROPPED_PROMPTS):
        parts.append(f"dropped {metrics[DROPPED_PROMPTS]} long prompts")
    phases = [f"{p} {metrics[f'time/{p}']:.2f}" for p in _PHASES if f"time/{p}" in metrics]
    if phases:
        parts.append("[" + " ".join(phases) + " s]")
    return " | ".join(parts)


class MetricsLogger:
    """Writes every numeric metric to TensorBoard under `log_dir` and keeps the history."""

    def __init__(self, log_dir: str, echo: bool = True):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.echo = echo
        self.history: list[dict] = []
        self._writer = SummaryWriter(log_dir=log_dir)

    def rewind(self, step: int) -> None:
        """Continue after `step` (a resume or restart from its checkpoint): later entries
        leave the history, and TensorBoard hides the events logged past it before."""
        self.history = [m for m in self.history if m.get("step", 0) <= step]
        self._writer.close()
        self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=step + 1)

    def log(self, step: int, metrics: dict) -> None:
        self.history.append(dict(metrics))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        if self.echo:
            tqdm.write(console_line(metrics))

    def close(self) -> None:
        self._writer.close()
