"""The vLLM plugin and our paged-attention backend, without starting an engine.

The backend's forward is driven the way vLLM drives it (chunked prefill, then decode steps,
two sequences batched, pages scattered over the cache) and must give, for every token, the
same bits as the trainer's varlen attention over the whole sequences.
"""

import importlib.metadata

import pytest
import torch

from lockstep import kernels
from lockstep.models.vllm import plugin
from lockstep.models.vllm.attention_backend import (
    LockstepAttentionBackend,
    LockstepAttentionImpl,
    LockstepAttentionMetadata,
    split_kv_cache,
)

HQ, HKV, D, BS = 4, 2, 32, 4


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "lockstep" and ep.value == "lockstep.models.vllm.plugin:register" for ep in eps)


def test_register_is_idempotent_and_fills_the_registries():
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    plugin.register()
    assert plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_CLASS_PATH
    assert plugin.backend_class() is LockstepAttentionBackend
    # The backend's name must be the enum slot vLLM's Attention layer looks it up by.
    assert AttentionBackendEnum[LockstepAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM
    # Stock models keep vLLM's own choice: the slots vLLM selects by default are untouched.
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()
    assert not AttentionBackendEnum.FLASH_ATTN.is_overridden()


def _vllm_layer_cache(num_blocks: int) -> torch.Tensor:
    """What vLLM hands a layer for our declared layout: logical [NB, Hkv, BS, 2D], physical [NB, BS, Hkv, 2D]."""
    order = LockstepAttentionBackend.get_kv_cache_stride_order()
    shape = LockstepAttentionBackend.get_kv_cache_shape(num_blocks, BS, HKV, D)
    physical = torch.full([shape[i] for i in order], float("nan"))  # garbage must never be read
    inverse = [order.index(i) for i in range(len(order))]
    return physical.permute(*inverse)


def test_kv_cache_views_split_each_page_into_k_and_v_blocks():
    kv_cache = _vllm_layer_cache(num_blocks=3)
    k_cache, v_cache = split_kv_cache(kv_cache, D)
    assert k_cache.shape == v_cache.shape == (3, BS, HKV, D)
    k_cache.fill_(1.0)
    v_cache.fill_(2.0)
    page = kv_cache.permute(0, 2, 1, 3).reshape(3, -1)  # each page's memory, in order
    half = page.shape[1] // 2
    assert torch.equal(page[:, :half], torch.ones(3, half))  # K block, then V block: no overlap, no gap
    assert torch.equal(page[:, half:], torch.full((3, half), 2.0))


def test_kv_cache_in_another_layout_is_refused():
    wrong = torch.zeros(3, HKV, BS, 2 * D)  # contiguous HND: not the layout we asked vLLM for
    with pytest.raises(RuntimeError, match="VLLM_KV_CACHE_LAYOUT"):
        split_kv_cache(wrong, D)


def test_unsupported_layer_options_are_refused():
    with pytest.raises(ValueError, match="sliding_window"):
        LockstepAttentionImpl(HQ, D, 0.1, HKV, sliding_window=8)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LockstepAttentionImpl(HQ, D, 0.1, HKV, kv_cache_dtype="fp8")


def test_paged_steps_equal_varlen_attention_bitwise():
    """Seq A (8 tokens): prefill 4, chunk 3, decode 1; seq B (5 tokens): prefill 3, decode 1, decode 1."""
    torch.manual_seed(0)
    lengths = {"a": 8, "b": 5}
    q = {s: torch.randn(n, HQ, D) for s, n in lengths.items()}
    k = {s: torch.randn(n, HKV, D) for s, n in lengths.items()}
    v = {s: torch.randn(n, HKV, D) for s, n in lengths.items()}
    scale = D**-0.5

    # The trainer's view: both sequences packed, full causal attention.
    cu = torch.tensor([0, 8, 13], dtype=torch.int32)
    packed = [torch.cat([t["a"], t["b"]]) for t in (q, k, v)]
    expected = kernels.attention_varlen(*packed, cu, scale)
    expected = {"a": expected[:8], "b": expected[8:]}

    # The generator's view: pages scattered over a 6-block cache.
    kv_cache = _vllm_layer_cache(num_blocks=6)
    block_table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)  # A: blocks 4, 1; B: blocks 0, 5
    impl = LockstepAttentionImpl(HQ, D, scale, HKV)
    steps = [{"a": (0, 4), "b": (0, 3)}, {"a": (4, 7), "b": (3, 4)}, {"a": (7, 8), "b": (4, 5)}]
    got = {s: torch.empty(n, HQ, D) for s, n in lengths.items()}
    for step in steps:
        spans = [step["a"], step["b"]]
        slots = torch.cat(
            [block_table[i, torch.arange(a, b) // BS].long() * BS + torch.arange(a, b) % BS for i, (a, b) in enumerate(spans)]
        )
        new = [b - a for a, b in spans]
        meta = LockstepAttentionMetadata(
            num_actual_tokens=sum(new),
            query_start_loc=torch.tensor([0, new[0], sum(new)], dtype=torch.int32),
            seq_lens=torch.tensor([b for _, b in spans], dtype=torch.int32),
            block_table=block_table,
            slot_mapping=slots,
        )
        pad = 2  # vLLM may pad the batch; padded rows must not be written nor read
        rows = lambda t: torch.cat([t["a"][slice(*spans[0])], t["b"][slice(*spans[1])], torch.zeros(pad, *t["a"].shape[1:])])
        output = torch.full((sum(new) + pad, HQ, D), float("nan"))
        impl.forward(None, rows(q), rows(k), rows(v), kv_cache, meta, output)
        got["a"][slice(*spans[0])] = output[: new[0]]
        got["b"][slice(*spans[1])] = output[new[0] : sum(new)]
        assert torch.equal(output[sum(new) :], torch.zeros(pad, HQ, D))

    for s in lengths:
        assert torch.equal(got[s], expected[s]), s


def test_profile_run_without_metadata_returns_zeros():
    impl = LockstepAttentionImpl(HQ, D, 0.1, HKV)
    output = torch.full((3, HQ, D), float("nan"))
    impl.forward(None, torch.randn(3, HQ, D), torch.randn(3, HKV, D), torch.randn(3, HKV, D), torch.empty(0), None, output)
    assert torch.equal(output, torch.zeros(3, HQ, D))
