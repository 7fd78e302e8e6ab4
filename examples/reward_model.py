"""A learned reward model as a reward class: trained here, loaded once per reward proc, scoring batches.

    python examples/reward_model.py [--steps 5] [--dir DIR]

1. `train_reward_model` fits a tiny character-level network to the built-in arithmetic
   task's own scores (`lockstep.controller.rewards:arithmetic`) on every "a+b=" prompt with
   right, near and wrong completions. It runs here in seconds (no hub) and saves
   DIR/reward_model.pt.
2. `RewardModel` is the reward class. Its constructor loads that file, once on each reward
   proc (it prints a line when it does). Its `__call__` scores a whole batch of (prompt,
   completion) pairs in one forward. On a mesh with `reward: {procs: 2, gpus: 1}` it would
   run on the reward proc's own GPU.
3. A short run of the built-in demo (strict barrier) uses it. The config names the class and
   its constructor arguments, exactly as on the command line:

    python controller/main.py reward.functions='[{fn: examples/reward_model.py:RewardModel, args: {path: DIR/reward_model.pt}}]'

   From Python, `session.set_reward(RewardModel, args={"path": ...})` does the same.
"""

import argparse
import os
import tempfile

import torch
from torch import nn

from lockstep import Session

CHARS = "0123456789+-*=() \n"  # the tiny model's characters (lockstep.models.tiny, vocab "arithmetic")
MAX_PROMPT_CHARS = 6  # "a+b=" with operands up to 99
MAX_COMPLETION_CHARS = 4  # the demo samples at most 3 tokens (one character each)


PAD, OTHER = len(CHARS), len(CHARS) + 1  # ids after the characters': padding, anything else


def encode(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """One-hot characters, prompt then completion, each padded: [batch, (6 + 4) * (len(CHARS) + 2)]."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        completion = completion.strip()
        ids = [_char_id(prompt, i) for i in range(MAX_PROMPT_CHARS)]
        ids += [_char_id(completion, i) for i in range(MAX_COMPLETION_CHARS)]
        if len(completion) > MAX_COMPLETION_CHARS:
            ids[-1] = OTHER  # too long: the last slot says so
        rows.append(ids)
    return nn.functional.one_hot(torch.tensor(rows), len(CHARS) + 2).flatten(1).float()


def _char_id(text: str, position: int) -> int:
    if position >= len(text):
        return PAD
    index = CHARS.find(text[position])
    return index if index >= 0 else OTHER


class RewardNet(nn.Module):
    def __init__(self, num_inputs: int, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                    nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, num_inputs] -> [batch] in (0, 1)
        return torch.sigmoid(self.layers(x)).squeeze(-1)


def training_pairs(max_operand: int, seed: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
    """Every "a+b=" with the answer, every other number up to 2 * max_operand + 10, the answer
    followed by each character, some random strings and nothing, labelled by the task's own reward."""
    from lockstep.controller.rewards import arithmetic

    g = torch.Generator().manual_seed(seed)
    prompts, completions, labels = [], [], []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            answer = str(a + b)
            candidates = [str(n) for n in range(2 * max_operand + 11)] + [answer + c for c in CHARS] + [""]
            candidates += ["".join(CHARS[i] for i in torch.randint(len(CHARS), (int(n),), generator=g))
                           for n in torch.randint(1, MAX_COMPLETION_CHARS, (40,), generator=g)]
            for completion in candidates:
                prompts.append(f"{a}+{b}=")
                completions.append(completion)
                labels.append(arithmetic(f"{a}+{b}=", completion, answer))
    return prompts, completions, torch.tensor(labels)


def train_reward_model(path: str, max_operand: int = 4, num_steps: int = 400, seed: int = 0) -> str:
    """Fit RewardNet to the arithmetic reward; save it to `path`; print the held-out error."""
    torch.manual_seed(seed)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains fastest on one thread
    prompts, completions, labels = training_pairs(max_operand, seed)
    x = encode(prompts, completions)
    held_out = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: len(labels) // 10]
    train = torch.ones(len(labels), dtype=torch.bool)
    train[held_out] = False
    net = RewardNet(x.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(num_steps):
        loss = nn.functional.mse_loss(net(x[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        error = (net(x[~train]) - labels[~train]).abs().mean().item()
    torch.set_num_threads(num_threads)
    print(f"reward model: {len(labels)} pairs, {num_steps} steps, mean |error| {error:.3f} on held-out pairs")
    torch.save({"num_inputs": x.shape[1], "state_dict": net.state_dict()}, path)
    return path


class RewardModel:
    """The reward class: built once per reward proc, then one forward per batch."""

    def __init__(self, path: str):
        checkpoint = torch.load(path, weights_only=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # the reward proc's own GPU, if any
        self.net = RewardNet(checkpoint["num_inputs"]).to(self.device).eval()
        self.net.load_state_dict(checkpoint["state_dict"])
        print(f"reward model loaded from {path} (pid {os.getpid()})", flush=True)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        return self.net(encode(prompts, completions).to(self.device)).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write reward_model.pt (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="lockstep-reward-model-")
    path = train_reward_model(os.path.join(directory, "reward_model.pt"))

    reward = {"functions": [{"fn": f"{os.path.abspath(__file__)}:RewardModel", "args": {"path": path}}]}
    with Session(mesh="local-cpu", reward=reward) as session:  # the built-in demo, strict barrier
        session.run(args.steps)
        print("mean reward per step:", [round(m["reward/mean"], 3) for m in session.metrics])
        print("differing tokens per step:", [m["barrier/num_differing_tokens"] for m in session.metrics])


if __name__ == "__main__":
    main()
