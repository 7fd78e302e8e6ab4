"""The trainer's policy module: packed tokens -> fp32 logprobs of the sampled tokens.

`Scorer` is the root module the optimizer, FSDP and checkpoints see: lockstep's Qwen3
(`token_logprobs_packed`, the same calls the generator makes, so the barrier can compare
bits) or TorchTitan's own Qwen3 for `model.impl=stock` (the baseline).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lockstep.actors.packing import PackedBatch


class Scorer(nn.Module):
    """Root module: one forward from packed tokens to fp32 logprobs [N].

    lm_head runs inside this forward, so under FSDP the root group (embedding, final norm,
    lm_head; one group because Qwen3 ties the embedding to lm_head) is gathered around it.
    """

    def __init__(self, model: nn.Module, impl: str, config):
        super().__init__()
        self.model = model
        self.impl = impl
        self.config = config  # lockstep.models.qwen3.Qwen3Config

    def forward(self, tokens, positions, cu_seqlens, target_index, target_ids, temperature: float):
        from lockstep import kernels

        if self.impl == "lockstep":
            from lockstep.models.qwen3 import token_logprobs_packed

            return token_logprobs_packed(
                self.model, tokens, positions, cu_seqlens, target_index, target_ids, temperature
            )
        # TorchTitan's Qwen3 takes [B, S]: right-pad each sample into its own row (causal
        # attention never reads the padding to the right of a token).
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
        seq_of_row = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths)
        col_of_row = torch.arange(tokens.numel(), device=tokens.device) - cu_seqlens[:-1].long()[seq_of_row]
        padded = tokens.new_zeros(len(lengths), int(lengths.max()))  # [B, S]
        padded[seq_of_row, col_of_row] = tokens
        logits = self.model(padded)  # [B, S, V]
        picked = logits[seq_of_row[target_index], col_of_row[target_index]].float()  # [N, V]
        return kernels.token_logprobs(picked, target_ids, temperature)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights under HF names (DTensor shards under FSDP)."""
        from lockstep.models.qwen3.state_dict_adapter import to_hf

        return to_hf(self.model.state_dict(), self.config)

    def score(self, packed: PackedBatch, temperature: float) -> torch.Tensor:
        return self(packed.tokens, packed.positions, packed.cu_seqlens, packed.target_index,
                    packed.target_ids, temperature)


def build_scorer(model_cfg, device: torch.device) -> Scorer:
    """The policy from `model_cfg.path` (a HF checkpoint dir; empty = tiny), wrapped for scoring."""
    if model_cfg.impl == "lockstep":
        from lockstep.models import build_model

        model = build_model(model_cfg, device)
        return Scorer(model, "lockstep", model.config)
    if model_cfg.impl == "stock":
        from torchtitan.models.qwen3 import Qwen3Model as TitanQwen3Model

        from lockstep.models import checkpoint_path
        from lockstep.models.qwen3 import Qwen3Config
        from lockstep.models.qwen3.state_dict_adapter import from_hf, read_safetensors, titan_model_args

        path = checkpoint_path(model_cfg)
        config = Qwen3Config.from_hf(path)
        with torch.device("meta"):
            model = TitanQwen3Model(titan_model_args(config))
        # Allocate without random init; to_empty unties a tied lm_head, so tie again.
        model = model.to_empty(device=device).to(model_cfg.torch_dtype)
        if config.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        with torch.device(device):
            model.rope_cache = model._precompute_rope_cache()  # fp32, as TorchTitan keeps it
        model.load_state_dict(from_hf(read_safetensors(path), config), strict=True)
        return Scorer(model, "stock", config)
    raise ValueError(f"model.impl={model_cfg.impl!r}: must be 'lockstep' or 'stock'")


def apply_tp(scorer: Scorer, tp_mesh: DeviceMesh) -> None:
    """Tensor parallelism over `tp_mesh` (impl=lockstep): DTensor parameters placed by
    models/qwen3/sharding.py, the model run by models/qwen3/parallelize.py. Before FSDP."""
    from lockstep.models.qwen3.parallelize import TPComm, distribute_parameters, parallelize

    distribute_parameters(scorer.model, tp_mesh)
    parallelize(scorer.model, TPComm(tp_mesh.get_group()))


def apply_fsdp(scorer: Scorer, dp_mesh: DeviceMesh) -> None:
    """FSDP2 the TorchTitan way (one group per block, gradient division left to the loss).

    Unlike TorchTitan's apply_fsdp, the embedding, final norm and lm_head stay in the root
    group: sharding the embedding and lm_head apart would untie a tied lm_head.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division

    # Parameters keep the checkpoint dtype end to end: the generator runs that dtype too.
    fsdp_config = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy()}
    for block in scorer.model.layers.values():
        fully_shard(block, **fsdp_config, reshard_after_forward=True)
    fully_shard(scorer, **fsdp_config)
    disable_fsdp_gradient_division(scorer)
    # A divide factor of 1 needs no PREMUL_SUM, which gloo lacks: plain SUM everywhere.
    for module in scorer.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
