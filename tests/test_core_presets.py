"""Presets find the right layers in tiny real diffusers / transformers models built in code."""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

import delora_diffusion as dd


def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 12,
        norm_num_groups=8,
    )


def sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    )  # fmt: skip


def flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip


def pixart() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=16, norm_num_groups=None,
    )  # fmt: skip


def sana() -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1,
    )  # fmt: skip


def clip(with_projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))


def adapted(model) -> list[str]:
    return [name for name, _, _, _ in dd.iter_delora_layers(model)]


CASES = [
    # (builder, preset or None for auto, regex every adapted layer must match, expected count)
    (
        sd_unet,
        None,
        r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        4 * 8,
    ),
    (sdxl_unet, "unet", r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)", (2 + 2 + 2 + 2) * 8),
    (sd3, None, r"transformer_blocks\.\d\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)", 15),
    (
        flux,
        None,
        r"(single_)?transformer_blocks\.\d\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)",
        8 + 6,
    ),
    (pixart, None, r"transformer_blocks\.\d\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", 16),
    (sana, "dit", r"transformer_blocks\.\d\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", 16),
    (clip, None, r"(text_model\.)?encoder\.layers\.\d\.self_attn\.(q|k|v|out)_proj", 8),
    (lambda: clip(True), "clip", r"(text_model\.)?encoder\.layers\.\d\.self_attn\.(q|k|v|out)_proj", 8),
    (t5, None, r"encoder\.block\.\d\.layer\.0\.SelfAttention\.[qkvo]", 8),
]


@pytest.mark.parametrize("builder, preset, pattern, count", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_presets_find_the_attention_projections(builder, preset, pattern, count):
    model = builder()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=preset))
    names = adapted(model)
    assert len(names) == count, names
    assert all(re.fullmatch(pattern, n) for n in names), names


def test_unet_opt_in_presets_add_projections_feed_forward_and_convs():
    counts = {}
    for preset in ("unet", "unet-proj", "unet-ff", "unet-conv", "unet-all"):
        model = sd_unet()
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=preset))
        counts[preset] = adapted(model)
    base = len(counts["unet"])
    assert len(counts["unet-proj"]) == base + 4 * 2  # proj_in/proj_out of the 4 transformer models
    assert len(counts["unet-ff"]) == base + 4 * 2
    assert any(n.endswith("resnets.0.conv1") for n in counts["unet-conv"])
    assert len(counts["unet-all"]) == len(set(sum(counts.values(), [])))


def test_flux_all_adds_single_block_mlp():
    model = flux()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules="flux-all"))
    names = adapted(model)
    assert "single_transformer_blocks.1.proj_mlp" in names and "single_transformer_blocks.1.proj_out" in names
    assert "proj_out" not in names  # the model's final projection is not a block's


def test_no_match_names_the_model_class_and_shows_module_names():
    with pytest.raises(ValueError, match=r"matched no module of UNet2DConditionModel.*include: conv_in, "):
        dd.inject_delora(sd_unet(), dd.DeLoRAConfig(rank=2, target_modules=["q_proj"]))


def test_unknown_model_class_without_targets_asks_for_them():
    with pytest.raises(ValueError, match="No DeLoRA preset for Linear; pass target_modules"):
        dd.inject_delora(torch.nn.Linear(2, 2), dd.DeLoRAConfig(rank=1))


def test_unet_forward_backward_with_gradient_checkpointing_matches_plain():
    sample, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 5, 16)
    grads = []
    for checkpointing in (False, True):
        unet = sd_unet()
        torch.manual_seed(1)
        dd.inject_delora(unet, dd.DeLoRAConfig(rank=2, lambda_init=0.5, target_modules="unet-all"))
        with torch.no_grad():
            for _, _, _, a in dd.iter_delora_layers(unet):
                a.delora_A.mul_(1.3)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet(sample, t, ctx).sample.square().mean().backward()
        grads.append([p.grad for g in dd.delora_parameters(unet) for p in g["params"]])
    assert all(g is not None for g in grads[1])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(plain, ckpt, atol=1e-6, rtol=1e-4)


def test_coexists_with_peft_lora_in_either_order():
    peft = pytest.importorskip("peft")
    sample, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    lora_config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)

    def run(order: str, disable: str = ""):
        unet = sd_unet()
        torch.manual_seed(5)
        steps = {
            "lora": lambda: unet.add_adapter(lora_config),
            "delora": lambda: dd.inject_delora(unet, dd.DeLoRAConfig(rank=2, lambda_init=0.5, init="zero")),
        }
        for step in filter(None, order.split("+")):
            steps[step]()
        # Same adapter weights whatever the order (injection order changes what the global RNG gives).
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_" in name or "delora_A" in name or "delora_B" in name:
                    gen = torch.Generator().manual_seed(zlib.crc32(name.replace(".base_layer", "").encode()))
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        if disable == "delora":
            dd.disable_delora(unet)
        elif disable == "lora":
            unet.disable_adapters()
        with torch.no_grad():
            return unet(sample, t, ctx).sample

    base = run("")
    lora_only, delora_only = run("lora"), run("delora")
    assert not torch.allclose(lora_only, base, atol=1e-4) and not torch.allclose(delora_only, base, atol=1e-4)
    for order in ("lora+delora", "delora+lora"):
        both = run(order)
        assert not torch.allclose(both, lora_only, atol=1e-4) and not torch.allclose(
            both, delora_only, atol=1e-4
        )
        torch.testing.assert_close(both, run("lora+delora"), atol=1e-5, rtol=1e-4)
        # Switching either one off leaves exactly the other.
        torch.testing.assert_close(run(order, disable="delora"), lora_only, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(run(order, disable="lora"), delora_only, atol=1e-5, rtol=1e-4)
