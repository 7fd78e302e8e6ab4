"""Tensor parallelism keeps TP=1's bits: 2 and 4 gloo procs, fp32 and bf16 (torch.equal).

Each proc builds the model twice from one checkpoint: whole (TP=1, no communication) and as
its TP rank (sharding.py's rows, parallelize.py's forwards). Logits, token logprobs, every
gradient (a rank's rows of TP=1's) must be equal bit for bit, and the backward must repeat.
The shape keeps each rank's share of every sharded dim a multiple of kernels.TILE_K (32),
the condition for the CPU backward's combined partials to be TP=1's bits.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import Qwen3Config, Qwen3Model, VarlenMeta, token_logprobs_packed, tp_shard
from lockstep.models.qwen3.parallelize import TPComm, parallelize
from lockstep.models.tiny import write_tiny_checkpoint

SHAPE = dict(vocab="ascii", vocab_size=256, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
             head_dim=32, intermediate_size=256)


def shard_whole_model(model, rank: int, size: int) -> None:
    """Replace every parameter with this rank's rows of it (the generator's layout)."""
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{pname}" if name else pname
            local = tp_shard(full_name, p.detach(), rank, size, model.config.num_kv_heads).clone()
            setattr(module, pname, nn.Parameter(local))
    model.tie_weights()


def run_step(model, temperature=0.7):
    """Packed forward of 2 sequences, logprobs of 5 targets, a loss, backward."""
    device = model.output.weight.device
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.config.vocab_size, (11,), generator=gen).to(device)
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], device=device)
    cu_seqlens = torch.tensor([0, 6, 11], dtype=torch.int32, device=device)
    target_index = torch.tensor([2, 3, 5, 8, 9], device=device)
    target_ids = torch.randint(0, model.config.vocab_size, (5,), generator=gen).to(device)
    hidden = model(tokens, positions, VarlenMeta(cu_seqlens))
    logits = model.logits(hidden[target_index])
    logprobs = token_logprobs_packed(model, tokens, positions, cu_seqlens, target_index, target_ids, temperature)
    weights = torch.linspace(-1.0, 2.0, 5, device=device)
    (logprobs * weights).sum().backward()
    return logits.detach(), logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def build(config, state_dict, device="cpu"):
    model = Qwen3Model(config)
    model.load_state_dict(state_dict)
    model.tie_weights()
    model = model.to(device)
    model.init_buffers(device)
    return model


def _worker(rank: int, size: int, init_file: str, models: dict, device_type: str = "cpu") -> None:
    """On CUDA the backward is only checked to repeat: the GPU linear's chained K does not
    recombine, so the input gradients' combined partials are not TP=1's bits there."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        comm = TPComm()
        for dtype, (config, state_dict) in models.items():
            ref_logits, ref_logprobs, ref_grads = run_step(build(config, state_dict, device))
            results = []
            for _ in range(2):  # the backward must repeat bit for bit
                model = build(config, state_dict)
                shard_whole_model(model, rank, size)
                model = model.to(device)
                model.init_buffers(device)
                parallelize(model, comm)
                results.append(run_step(model))
            logits, logprobs, grads = results[0]
            assert torch.equal(logits, ref_logits), f"{dtype}: TP={size} logits differ from TP=1"
            assert torch.equal(logprobs, ref_logprobs), f"{dtype}: TP={size} logprobs differ from TP=1"
            for name, grad in grads.items():
                assert torch.equal(grad, results[1][2][name]), f"{dtype}: {name} grad differs between two runs"
                if device.type == "cuda":
                    continue
                want = tp_shard(name, ref_grads[name], rank, size, 4)
                assert torch.equal(grad, want), f"{dtype}: TP={size} grad of {name} differs from TP=1's rows"
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "float32": str(write_tiny_checkpoint(root / "tied", tie_word_embeddings=True, **SHAPE)),
        "bfloat16": str(write_tiny_checkpoint(root / "untied", tie_word_embeddings=False, dtype="bfloat16", **SHAPE)),
    }


@pytest.mark.parametrize("size", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 procs on 2 cores: ~1 min
def test_tp_forward_logprobs_and_grads_equal_tp1(size, tp_checkpoints, tmp_path):
    # Loaded here, so the procs start without TorchTitan (the HF name table): seconds each.
    models = {}
    for dtype, path in tp_checkpoints.items():
        model = build_model(ModelConfig(path=path, dtype=dtype), "cpu")
        models[dtype] = (model.config, model.state_dict())
    mp.spawn(_worker, args=(size, str(tmp_path / "pg"), models), nprocs=size, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_gpus_forward_is_tp1s_bits_and_backward_repeats(tp_checkpoints, tmp_path):
    models = {}
    for dtype, path in tp_checkpoints.items():
        model = build_model(ModelConfig(path=path, dtype=dtype), "cpu")
        models[dtype] = (model.config, model.state_dict())
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), models, "cuda"), nprocs=2, join=True)


def test_tp_rejects_layouts_that_do_not_split(tp_checkpoints):
    from lockstep.models.qwen3.sharding import check_tp

    config = Qwen3Config.from_hf(tp_checkpoints["float32"])
    with pytest.raises(ValueError, match="tp=3: must be a power of two"):
        check_tp(config, 3)
    with pytest.raises(ValueError, match="num_heads=8"):
        check_tp(config, 16)
    with pytest.raises(ValueError, match="trainer layout tp=8 does not split the model's num_kv_heads=4"):
        check_tp(config, 8, field="trainer layout tp", trainer=True)
    check_tp(config, 8)  # the generator replicates a KV head over 2 ranks

