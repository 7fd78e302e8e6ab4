"""Per-position activations of a Qwen3Model, recorded with forward hooks (the divergence audit).

The generator (inside vLLM: one forward per prefill chunk and per decode step) and the
trainer (one packed forward) run this model class under the same module names, so the same
hooks on both sides record comparable rows: row i of a module's record is the token at
`positions[module][i]` of the one sequence being audited.

    with Capture(model) as capture:
        ...  # one sequence through `model`, in as many forward calls as the caller likes
    activations = capture.activations()
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Activations:
    """One sequence's recorded modules; rows of `outputs[m][k]` and `inputs[m][k]` are the
    token positions `positions[m]` (int64 [num_rows])."""

    order: list[str]  # module names in the order their forwards finished (execution order)
    positions: dict[str, torch.Tensor]
    outputs: dict[str, list[torch.Tensor]]  # each output (fused norms return two), [num_rows, ...]
    inputs: dict[str, list[torch.Tensor]]  # each per-token tensor argument, [num_rows, ...]


@dataclass
class CapturedRun:
    """One side's audit run of one sequence: its tokens, logprobs and activations."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: torch.Tensor  # fp32 [len(completion_ids)], this side's logprob of each completion token
    activations: Activations


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class Capture:
    """Forward hooks on every named submodule of `model` (a Qwen3Model) while in the `with` block.

    The sequence's positions must arrive in order, 0, 1, 2, ...: each forward's leading rows
    that continue that count are recorded; trailing rows (vLLM pads some batches, with
    position 0) are dropped. The output head sees only the rows that predict a token:
    `logits_positions` gives their positions in call order (the trainer's target rows);
    without it, each head call is one row, the last position of the preceding forward (a
    generator decoding one sequence).
    """

    def __init__(self, model: nn.Module, *, logits_positions: torch.Tensor | None = None):
        self.model = model
        self._head = getattr(model, "output", None)
        self._logits_positions = None if logits_positions is None else logits_positions.detach().cpu()
        self._num_logits = 0
        self._next_position = 0
        self._call_rows = 0  # rows of the current forward, padding included
        self._call_positions = torch.empty(0, dtype=torch.int64)  # its recorded (leading) positions
        self._records: dict[str, list[tuple[torch.Tensor, list, list]]] = {}
        self._handles: list = []
        self._error: str | None = None  # raised by activations(), not inside the caller's engine

    def __enter__(self) -> "Capture":
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for name, module in self.model.named_modules():
            if name and not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
                self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, module, args, kwargs) -> None:
        positions = (args[1] if len(args) > 1 else kwargs["positions"]).detach().cpu().clone()  # [T]
        expected = torch.arange(self._next_position, self._next_position + len(positions))
        num_recorded = int((positions == expected).long().cumprod(0).sum())
        if num_recorded == 0 and self._error is None:
            self._error = (
                f"capture: a forward starts at position {int(positions[0])}, expected {self._next_position}; "
                "capture one sequence at a time, its tokens in order"
            )
        self._call_rows = len(positions)
        self._call_positions = positions[:num_recorded]
        self._next_position += num_recorded

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            outputs = _tensors(output)
            if not outputs:
                return
            if module is self._head:
                positions = self._head_positions(outputs[0].shape[0])
                num_rows = outputs[0].shape[0]
            else:
                positions, num_rows = self._call_positions, self._call_rows
            rope_cache = getattr(self.model, "rope_cache", None)
            inputs = [
                t for t in _tensors(list(args) + list(kwargs.values()))
                if t is not rope_cache and t.dim() > 0 and t.shape[0] == num_rows
            ]
            rows = len(positions)
            self._records.setdefault(name, []).append((
                positions,
                [t.detach()[:rows].cpu().clone() for t in outputs if t.dim() > 0 and t.shape[0] == num_rows],
                [t.detach()[:rows].cpu().clone() for t in inputs],
            ))

        return hook

    def _head_positions(self, num_rows: int) -> torch.Tensor:
        if self._logits_positions is None:
            return self._call_positions[-1:]  # the row that predicts the next token
        start, self._num_logits = self._num_logits, self._num_logits + num_rows
        return self._logits_positions[start:self._num_logits]

    def activations(self) -> Activations:
        """Every module's calls concatenated by row, in execution order."""
        if self._error is not None:
            raise RuntimeError(self._error)
        out = Activations(order=list(self._records), positions={}, outputs={}, inputs={})
        for name, calls in self._records.items():
            out.positions[name] = torch.cat([positions for positions, _, _ in calls])
            out.outputs[name] = [torch.cat(items) for items in zip(*(outs for _, outs, _ in calls))]
            out.inputs[name] = [torch.cat(items) for items in zip(*(ins for _, _, ins in calls))]
        return out
