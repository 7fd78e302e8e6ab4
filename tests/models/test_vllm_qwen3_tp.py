"""lockstep's Qwen3 tensor-parallel inside vLLM on 2 GPUs (-m gpu): one engine over 2 procs
(external launcher, CUDA graphs and eager) samples the same tokens with the same logprob bits
as a TP=1 engine. On CPU the same path runs end to end in tests/test_main.py (local-cpu-tp2)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lockstep.models.tiny import write_tiny_checkpoint

PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]
SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, size, path, port, eager, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from lockstep.actors.generation import Generator
    from lockstep.actors.vllm_engine import GeneratorConfig
    from lockstep.models import ModelConfig

    gen_cfg = GeneratorConfig(max_tokens=12, gpu_memory_utilization=0.2, enforce_eager=eager)
    generator = Generator(ModelConfig(path=path, dtype="bfloat16"), gen_cfg, "cuda", tp=size)
    samples = generator.generate(PROMPTS, [{}] * len(PROMPTS), 0, n=2, seeds=list(range(len(PROMPTS))))
    torch.save([(s.completion_ids, s.logprobs) for s in samples], os.path.join(out_dir, f"tp{size}-rank{rank}.pt"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_vllm_tp2_samples_tp1s_tokens_and_logprob_bits(tmp_path, eager):
    path = str(write_tiny_checkpoint(tmp_path / "ckpt", vocab="ascii", dtype="bfloat16", **SHAPE))
    for size in (1, 2):
        mp.spawn(_worker, args=(size, path, _free_port(), eager, str(tmp_path)), nprocs=size, join=True)
    want = torch.load(tmp_path / "tp1-rank0.pt")
    for rank in range(2):
        got = torch.load(tmp_path / f"tp2-rank{rank}.pt")
        assert [ids for ids, _ in got] == [ids for ids, _ in want]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
