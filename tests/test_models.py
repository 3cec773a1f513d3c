import pytest
import torch

from sd3_adrpo.models import add_lora, lora_state_dict, load_pipeline, reference_mode


def _velocity(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=ctx,
                           pooled_projections=pooled, return_dict=False)[0]


def test_pipeline_is_frozen_and_t5_dropped(tiny_pipe):
    assert tiny_pipe.text_encoder_3 is None and tiny_pipe.tokenizer_3 is None
    for m in (tiny_pipe.transformer, tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.text_encoder_2):
        assert not any(p.requires_grad for p in m.parameters())


def test_adapter_off_is_the_frozen_base_bit_for_bit(tiny_pipe):
    transformer = tiny_pipe.transformer
    base = _velocity(transformer)
    params = add_lora(transformer, rank=4)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert torch.equal(_velocity(transformer), base)  # B = 0 at init: policy starts at the reference
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.5)
    policy = _velocity(transformer)
    assert not torch.allclose(policy, base)
    with reference_mode(transformer):
        assert torch.equal(_velocity(transformer), base)
    assert torch.equal(_velocity(transformer), policy)  # the adapter is back on after the block


def test_lora_targets_and_state_dict(tiny_pipe):
    add_lora(tiny_pipe.transformer, rank=2, targets=["to_q", "to_v"])
    keys = list(lora_state_dict(tiny_pipe.transformer))
    assert keys and all(("to_q" in k or "to_v" in k) and "lora" in k for k in keys)
    with pytest.raises(ValueError, match="not found in the base model"):
        add_lora(load_pipeline(str(tiny_pipe.config._name_or_path), drop_t5=True).transformer, 2, targets=["nope"])
