import os

import pytest

from lockstep.controller.config import ConfigError, LoopConfig, RunConfig, load_config, parse_overrides


def test_default_config_is_the_arithmetic_demo():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.data.source == "arithmetic" and cfg.model.path == "" and cfg.loop.barrier == "strict"


def test_strict_barrier_on_the_stock_model_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.impl=stock does not give bitwise-equal logprobs.*loop.barrier=measure"):
        load_config(None, ["model.impl=stock"])
    assert load_config(None, ["model.impl=stock", "loop.barrier=measure"]).loop.barrier == "measure"


def test_top_p_loads_under_the_strict_barrier():
    # The generator reports the full-softmax logprob whatever the nucleus (models/vllm/qwen3.py).
    assert load_config(None, ["generator.top_p=0.9"]).generator.top_p == 0.9
    with pytest.raises(ConfigError, match=r"generator.top_p=1.5.*must be in \(0, 1\]"):
        load_config(None, ["generator.top_p=1.5"])


def test_timeouts_and_recovery_keys():
    cfg = load_config(None, ["loop.timeouts.reward=5", "loop.timeouts.generate=0", "loop.max_restarts=2",
                             "loop.keep_checkpoints=0"])
    assert cfg.loop.timeouts.seconds("reward") == 5.0 and cfg.loop.timeouts.seconds("generate") is None
    assert (cfg.loop.max_restarts, cfg.loop.keep_checkpoints) == (2, 0)


def test_yaml_plus_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "trainer: {lr: 3e-4}\n"  # YAML 1.1 reads 3e-4 as a string; the float field takes it
        "data: {prompts_per_step: 4}\n"
        "reward:\n  functions:\n    - {fn: 'lockstep.controller.rewards:arithmetic', weight: 2}\n"
    )
    cfg = load_config(str(path), ["trainer.lr=1e-2", "generator.temperature=0.7", "loop.barrier=strict", "loop.steps=3"])
    assert cfg.trainer.lr == 1e-2 and isinstance(cfg.trainer.lr, float)
    assert cfg.generator.temperature == 0.7
    assert cfg.loop.barrier == "strict" and cfg.loop.steps == 3
    assert cfg.data.prompts_per_step == 4
    assert cfg.reward.functions[0].fn == "lockstep.controller.rewards:arithmetic"
    assert cfg.reward.functions[0].weight == 2.0


def test_reward_function_from_the_command_line():
    cfg = load_config(None, ["reward.functions=examples/custom_reward.py:exact_and_short"])
    assert [f.fn for f in cfg.reward.functions] == ["examples/custom_reward.py:exact_and_short"]
    assert cfg.reward.functions[0].weight == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        (["trainer.lrr=1"], r"unknown config key trainer.lrr; valid keys under trainer: lr, "),
        (["optimiser.lr=1"], r"unknown config key optimiser; valid keys under the top level: model, "),
        (["trainer.lr=fast"], r"config key trainer.lr='fast': expected a number, e.g. trainer.lr=0.5"),
        (["loop.steps=2.5"], r"config key loop.steps='2.5': expected an integer"),
        (["loop.barrier=sometimes"], r"loop.barrier='sometimes' is not one of strict\|measure\|off"),
        (["data.source=mnist"], r"data.source='mnist' is not one of"),
        (["lr=3"], r"override 'lr=3': write it as section.key=value"),
        (["trainer.lr"], r"write it as section.key=value"),
        (["loop.timeouts.rewrd=1"], r"unknown config key loop.timeouts.rewrd; valid keys under loop.timeouts: start, "),
        (["loop.timeouts.reward=-1"], r"loop.timeouts.reward=-1.0: must be a number of seconds >= 0 \(0 = no limit\)"),
        (["loop.max_restarts=-1"], r"loop.max_restarts=-1 must be >= 0"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, override)
    assert "\n" not in str(e.value)


def test_wrong_yaml_type_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loop: {steps: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"loop.steps=\[1, 2\]: expected an integer"):
        load_config(str(path))
    path.write_text("loop: 3\n")
    with pytest.raises(ConfigError, match="config key loop must be a mapping of LoopConfig fields"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_parse_overrides_nests_sections():
    assert parse_overrides(["a.b=1", "a.c=x", "d.e.f=2"]) == {"a": {"b": "1", "c": "x"}, "d": {"e": {"f": "2"}}}


def test_loop_dirs_are_filled_at_run_time():
    loop = LoopConfig()
    assert loop.log_dir == ""
    loop.resolve_dirs()
    # absolute: a resumed run may start from another working directory
    assert loop.log_dir.startswith(os.path.abspath("runs") + "/") and loop.checkpoint_dir == f"{loop.log_dir}/checkpoints"
