import json

import pytest

from lockstep.controller import data, rewards
from lockstep.controller.data import DataConfig, PromptStream, arithmetic_dataset, load_source


def test_arithmetic_dataset_is_complete_deterministic_and_seeded():
    a, b = arithmetic_dataset(9, seed=3), arithmetic_dataset(9, seed=3)
    assert a["prompt"] == b["prompt"] and len(a) == 100
    assert a["prompt"] != arithmetic_dataset(9, seed=4)["prompt"]
    assert sorted(a["prompt"]) == sorted(f"{x}+{y}=" for x in range(10) for y in range(10))
    for row in a:
        x, y = row["prompt"][:-1].split("+")
        assert row["answer"] == str(int(x) + int(y))


def test_prompt_stream_batches_cover_each_epoch_and_resume():
    ds = arithmetic_dataset(2, seed=0)  # 9 prompts
    stream = PromptStream(ds, prompts_per_step=4, seed=1)
    seen = [p for _ in range(2) for p in stream.next_batch()[0]] + stream.next_batch()[0][:1]
    assert sorted(seen) == sorted(ds["prompt"])  # first 9 = one full epoch
    state = stream.state_dict()
    expected = stream.next_batch()
    resumed = PromptStream(ds, 4, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch() == expected
    prompts, fields = expected
    assert [f["answer"] for f in fields] == [str(eval(p[:-1])) for p in prompts]


def test_jsonl_source_keeps_extra_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i), "level": i}) for i in range(3)))
    ds = load_source(DataConfig(source="jsonl", path=str(path)))
    prompts, fields = PromptStream(ds, 3).next_batch()
    assert sorted(prompts) == ["q0", "q1", "q2"]
    assert {f["answer"]: f["level"] for f in fields} == {"0": 0, "1": 1, "2": 2}


def test_jsonl_without_prompt_column_names_the_fix(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "x"}))
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        load_source(DataConfig(source="jsonl", path=str(path)))


def test_bad_data_config_is_one_line():
    with pytest.raises(ValueError, match="data.source='mnist' is not one of"):
        DataConfig(source="mnist")
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="jsonl")


def test_gsm8k_offline_fails_fast_with_a_clear_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda host="huggingface.co": False)
    with pytest.raises(RuntimeError, match="cannot reach huggingface.co.*data.source=jsonl"):
        load_source(DataConfig(source="gsm8k"))


@pytest.mark.parametrize(
    "completion, reward",
    [("19", 1.0), (" 19 ", 1.0), ("19+", 0.5), ("18", 0.225), ("21", 0.2), ("15=3", 0.15), ("7", 0.0),
     ("019", 0.0), ("+1", 0.0), ("", 0.0)],
)
def test_arithmetic_reward(completion, reward):
    assert rewards.arithmetic("12+7=", completion, answer="19") == pytest.approx(reward)


def test_gsm8k_reward_reads_the_last_number():
    assert rewards.gsm8k("q", "so 3 + 4 = 7. The answer is 1,234.", answer="1234") == 1.0
    assert rewards.gsm8k("q", "it is 12 then 13", answer="12") == 0.0
    assert rewards.gsm8k("q", "no idea", answer="12") == 0.0


def test_an_empty_or_broken_jsonl_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"^data.path='.*empty.jsonl' has no rows; write one JSON object per line"):
        load_source(DataConfig(source="jsonl", path=str(empty)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1="}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"^data.path='.*broken.jsonl' is not readable as JSON lines \(") as e:
        load_source(DataConfig(source="jsonl", path=str(broken)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^the prompts is empty; give it at least one prompt$"):
        PromptStream(arithmetic_dataset(2).select([]), 2, what="the prompts")


def test_prompt_lengths_come_from_the_checkpoints_tokenizer(tmp_path):
    from lockstep.models.tiny import write_tiny_checkpoint

    ds = arithmetic_dataset(12, seed=0)  # "3+4=" is 4 tokens, "12+7=" 5, "12+12=" 6: one per character
    counts = data.prompt_token_counts(ds, str(write_tiny_checkpoint(tmp_path / "tiny")))
    assert counts == [len(p) for p in ds["prompt"]]
    assert data.prompt_token_counts(ds, str(tmp_path)) is None  # no tokenizer.json: nothing to count with


def test_over_long_prompts_are_skipped_and_counted():
    ds = arithmetic_dataset(12, seed=0)
    lengths = [len(p) for p in ds["prompt"]]
    stream = PromptStream(ds, prompts_per_step=4, seed=1, prompt_lengths=lengths, max_prompt_tokens=5)
    assert stream.num_too_long == sum(n > 5 for n in lengths) > 0
    dropped, seen = 0, []
    for _ in range(30):
        prompts, _ = stream.next_batch()
        assert len(prompts) == 4 and all(len(p) <= 5 for p in prompts)
        dropped, seen = dropped + stream.num_dropped, seen + prompts
    assert dropped > 0 and len(seen) + dropped == sum(1 for _ in range(stream.epoch * len(ds) + stream.position))

    with pytest.raises(ValueError, match=r"^all 169 prompts of data.source=jsonl are longer than 3 tokens \(the longest "
                                         r"has 6\), so none fits; raise generator.max_model_len or lower generator.max_tokens$"):
        PromptStream(ds, 4, prompt_lengths=lengths, max_prompt_tokens=3, what="data.source=jsonl")


def test_resuming_the_stream_on_other_data_is_refused():
    stream = PromptStream(arithmetic_dataset(2), 4)
    stream.next_batch()
    state = stream.state_dict()
    with pytest.raises(ValueError, match=r"ran over 9 prompts, the dataset now has 16; resume with the same data"):
        PromptStream(arithmetic_dataset(3), 4).load_state_dict(state)
