"""Prompt sources, all as HF `datasets.Dataset`s with a `prompt` column plus fields.

  arithmetic  built in, procedurally generated "12+7=" -> answer "19" (the default task)
  gsm8k       openai/gsm8k from the Hub (needs network or a cached copy)
  jsonl       a local file with a `prompt` column; every other column becomes a field

Each source names its default reward (lockstep.controller.rewards), used when
`reward.functions` is empty. `PromptStream` yields seeded per-step batches.
"""

import os
import random
import socket
from dataclasses import dataclass

import datasets

SOURCES = ("arithmetic", "gsm8k", "jsonl")
DEFAULT_REWARDS = {
    "arithmetic": "lockstep.controller.rewards:arithmetic",
    "gsm8k": "lockstep.controller.rewards:gsm8k",
    "jsonl": "",  # no answer format is known: the user names one
}


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "arithmetic"
    path: str = ""  # jsonl: the file
    split: str = "train"
    prompts_per_step: int = 8
    seed: int = 0
    max_operand: int = 9  # arithmetic: operands drawn from [0, max_operand]

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {'|'.join(SOURCES)}")
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.source=jsonl needs data.path=FILE.jsonl")
        if self.prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step={self.prompts_per_step} must be >= 1")
        if self.max_operand < 0:
            raise ValueError(f"data.max_operand={self.max_operand} must be >= 0")


def arithmetic_dataset(max_operand: int = 9, seed: int = 0) -> datasets.Dataset:
    """Every "a+b=" with a, b in [0, max_operand], in a seeded order. Columns: prompt, answer."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    return datasets.Dataset.from_dict(
        {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )


def _hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def gsm8k_dataset(split: str = "train") -> datasets.Dataset:
    """openai/gsm8k as prompt + answer (the number after '####')."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ) not in ("", "0")
    if not offline and not _hub_reachable():
        raise RuntimeError(
            "data.source=gsm8k: cannot reach huggingface.co to download openai/gsm8k; go online "
            "once, set HF_HUB_OFFLINE=1 to use a cached copy, or use data.source=jsonl data.path=FILE"
        )
    try:
        raw = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:
        raise RuntimeError(
            f"data.source=gsm8k: could not load openai/gsm8k split {split!r} "
            f"({type(e).__name__}: {e}); check data.split (train|test) and the network"
        ) from None
    return raw.map(
        lambda row: {
            "prompt": f"Question: {row['question']}\nAnswer:",
            "answer": row["answer"].rsplit("####", 1)[-1].strip().replace(",", ""),
        },
        remove_columns=raw.column_names,
    )


def jsonl_dataset(path: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r}: no such file")
    with open(path, "rb") as f:
        if not any(line.strip() for line in f):
            raise ValueError(f"data.path={path!r} has no rows; write one JSON object per line, e.g. {{\"prompt\": \"3+4=\"}}")
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a local file: its "Generating split" bar is noise
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.path={path!r} is not readable as JSON lines ({first}); write one JSON object per line") from None
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()
    if "prompt" not in ds.column_names:
        raise ValueError(
            f"data.path={path!r} has columns {ds.column_names}; it needs a 'prompt' column"
        )
    return ds


def load_source(cfg: DataConfig) -> datasets.Dataset:
    if cfg.source == "arithmetic":
        return arithmetic_dataset(cfg.max_operand, cfg.seed)
    if cfg.source == "gsm8k":
        return gsm8k_dataset(cfg.split)
    return jsonl_dataset(cfg.path)


def prompt_token_counts(dataset: datasets.Dataset, tokenizer_dir: str) -> list[int] | None:
    """Tokens of each prompt as vLLM counts them (the checkpoint's tokenizer.json, special
    tokens included); None when the checkpoint has no tokenizer.json."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    return [len(e.ids) for e in tokenizer.encode_batch(list(dataset["prompt"]), add_special_tokens=True)]


class PromptStream:
    """Endless seeded batches of (prompts, fields); reshuffled each epoch.

    Prompts longer than `max_prompt_tokens` (per `prompt_lengths`) are skipped as the stream
    reaches them; `num_dropped` counts those skipped for the last batch. The state
    (epoch, position) is checkpointed, so a resumed run gets the batches it would have.
    """

    def __init__(self, dataset: datasets.Dataset, prompts_per_step: int, seed: int = 0, *,
                 prompt_lengths: list[int] | None = None, max_prompt_tokens: int | None = None,
                 what: str = "the prompt dataset"):
        if len(dataset) == 0:
            raise ValueError(f"{what} is empty; give it at least one prompt")
        self.dataset = dataset
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.epoch = 0
        self.position = 0  # next row in this epoch's order
        self.num_dropped = 0
        self._too_long: set[int] = set()
        if prompt_lengths is not None and max_prompt_tokens is not None:
            self._too_long = {i for i, n in enumerate(prompt_lengths) if n > max_prompt_tokens}
            if len(self._too_long) == len(dataset):
                raise ValueError(
                    f"all {len(dataset)} prompts of {what} are longer than {max_prompt_tokens} tokens "
                    f"(the longest has {max(prompt_lengths)}), so none fits; raise generator.max_model_len "
                    "or lower generator.max_tokens"
                )
        self._order = self._epoch_order()

    @property
    def num_too_long(self) -> int:
        return len(self._too_long)

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.dataset)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> tuple[list[str], list[dict]]:
        rows = []
        self.num_dropped = 0
        while len(rows) < self.prompts_per_step:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            row = self._order[self.position]
            self.position += 1
            if row in self._too_long:
                self.num_dropped += 1
            else:
                rows.append(row)
        batch = self.dataset.select(rows)
        fields = [{k: v for k, v in row.items() if k != "prompt"} for row in batch]
        return list(batch["prompt"]), fields

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        num_rows = state.get("num_rows", len(self.dataset))
        if num_rows != len(self.dataset):
            raise ValueError(
                f"the checkpoint's data stream ran over {num_rows} prompts, the dataset now has "
                f"{len(self.dataset)}; resume with the same data (data.path, data.split)"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
