"""Interop: exported LoRAs loaded by diffusers' own load_lora_weights, and PEFT DeLoRA in both directions."""

from __future__ import annotations

import copy

import pytest
import tiny_pipelines as tp
import torch
from conftest import PARTIAL_SCALE, max_diff

from delora_diffusion import export, io

LORA_TOLERANCE = 5e-3  # max pixel difference the issue allows between the LoRA export and DeLoRA


@pytest.mark.parametrize(
    "family,format",
    [("sd", "diffusers"), ("sdxl", "diffusers"), ("sd3", "diffusers"), ("flux", "diffusers"), ("sd", "kohya"), ("sdxl", "kohya"), ("flux", "kohya")],
)  # fmt: skip
def test_exported_lora_loads_in_diffusers_and_matches(family, format, trained, tmp_path):
    t = trained(family)
    out = export.export_lora(t.adapter_dir, tmp_path / "lora.safetensors", format=format, scale=PARTIAL_SCALE)
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_lora_weights(str(out))
    images = tp.run(pipe, family)
    assert max_diff(images, t.partial) <= LORA_TOLERANCE
    assert max_diff(images, t.base) > 4 * LORA_TOLERANCE  # the LoRA really applies (not a no-op)


def test_kohya_keys_look_like_kohya(trained):
    state = export.to_lora_state_dict(io.load_adapter(trained("sdxl").adapter_dir), "kohya")
    keys = sorted(state)
    assert any(
        k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys
    )
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert alphas and all(
        state[k].item() == state[k.replace(".alpha", ".lora_down.weight")].shape[0] for k in alphas
    )
    sd_state = export.to_lora_state_dict(io.load_adapter(trained("sd").adapter_dir), "kohya")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in sd_state)


def test_conv_layers_export_as_conv_lora(pipeline_dir, tmp_path):
    """Conv2d targets (resnet convs) export with conv-shaped factors that diffusers' loader accepts."""
    from conftest import make_nontrivial

    import delora_diffusion as dd

    pipe = tp.load_pipeline(pipeline_dir("sd"))
    dd.inject_delora(pipe.unet, dd.DeLoRAConfig(rank=2, lambda_init=0.5, target_modules="unet-conv"))
    make_nontrivial(pipe.unet)
    adapted = tp.run(pipe, "sd")
    pipe.save_delora_weights(tmp_path / "ad")
    out = export.export_lora(tmp_path / "ad", tmp_path / "lora", format="diffusers")
    state = io.read_safetensors_header(out)[0]
    assert state["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]["shape"] == [4, 16, 3, 3]  # paper: 2r
    fresh = tp.load_pipeline(pipeline_dir("sd"))
    fresh.load_lora_weights(str(out))
    assert max_diff(tp.run(fresh, "sd"), adapted) <= LORA_TOLERANCE
    with pytest.raises(ValueError, match="PEFT's DeLoRA supports nn.Linear only"):
        export.export_peft(tmp_path / "ad", tmp_path / "peft")


def test_t5_components_need_explicit_skip(pipeline_dir, tmp_path):
    import delora_diffusion as dd

    pipe = tp.load_pipeline(pipeline_dir("flux"))
    dd.inject_delora(pipe.text_encoder_2, dd.DeLoRAConfig(rank=2))
    dd.inject_delora(pipe.transformer, dd.DeLoRAConfig(rank=2))
    pipe.save_delora_weights(tmp_path)
    with pytest.raises(ValueError, match=r"adapts \['text_encoder_2'\] \(T5 encoders\).*--skip-unsupported"):
        export.export_lora(tmp_path, tmp_path / "l.safetensors")
    with pytest.warns(UserWarning, match="Leaving"):
        out = export.export_lora(tmp_path, tmp_path / "l.safetensors", skip_unsupported=True)
    assert all(k.startswith("transformer.") for k in io.read_safetensors_header(out)[0])


def _unet_inputs(unet):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    hidden = torch.randn(1, 6, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([10]), hidden


def test_peft_made_adapter_loads_and_matches_peft(pipeline_dir, tmp_path):
    """A DeLoRA adapter made with PEFT's own DeloraConfig/get_peft_model, loaded with load_delora_weights."""
    from peft import DeloraConfig, get_peft_model

    pipe = tp.load_pipeline(pipeline_dir("sd"))
    peft_unet = get_peft_model(
        copy.deepcopy(pipe.unet), DeloraConfig(r=3, delora_lambda=2, target_modules=["to_q", "to_v"])
    )
    peft_te = get_peft_model(
        copy.deepcopy(pipe.text_encoder), DeloraConfig(r=2, delora_lambda=1, target_modules=["q_proj"])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (peft_unet, peft_te):
            for name, param in model.named_parameters():
                if "delora_B" in name:  # PEFT starts with B = 0; move it as training would
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_unet.save_pretrained(tmp_path / "peft_unet")
    peft_te.save_pretrained(tmp_path / "peft_te")

    pipe.load_delora_weights(tmp_path / "peft_unet", adapter_name="u")  # routed by recorded class
    pipe.load_delora_weights(tmp_path / "peft_te", adapter_name="t")
    assert pipe.get_list_delora_adapters() == {"unet": ["u"], "text_encoder": ["t"]}
    with torch.no_grad():
        args = _unet_inputs(pipe.unet)
        ours = pipe.unet(*args).sample
        theirs = peft_unet(*args).sample
        assert (ours - pipe.unet(*args).sample).abs().max() == 0
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        ids = torch.arange(10).reshape(1, 10)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], peft_te(ids)[0], atol=1e-5, rtol=0)
        with pipe.delora_scale(0.0):
            assert (pipe.unet(*args).sample - theirs).abs().max() > 1e-4
    meta = pipe.get_delora_metadata("u")
    assert meta["kind"] == "peft" and meta["configs"]["unet"]["init"] == "zero"


def test_peft_adapter_routing_needs_component_when_ambiguous(pipeline_dir, tmp_path):
    """SD3 has two CLIPTextModelWithProjection encoders of the same size: the caller must choose."""
    from peft import DeloraConfig, get_peft_model

    pipe = tp.load_pipeline(pipeline_dir("sd3"))
    peft_te = get_peft_model(copy.deepcopy(pipe.text_encoder_2), DeloraConfig(r=2, target_modules=["q_proj"]))
    peft_te.save_pretrained(tmp_path)
    with pytest.raises(
        io.DeLoRAFileError, match=r"fits several components \['text_encoder', 'text_encoder_2'\]"
    ):
        pipe.load_delora_weights(tmp_path)
    assert pipe.get_list_delora_adapters() == {}
    pipe.load_delora_weights(tmp_path, component="text_encoder_2")
    assert pipe.get_list_delora_adapters() == {"text_encoder_2": ["default"]}


def test_export_peft_continues_in_peft(trained, tmp_path):
    """Our paper-init adapter exported to PEFT (rank 2r, lambda 2x) gives PEFT models the same outputs."""
    from peft import PeftModel

    t = trained("sd")
    written = export.export_peft(t.adapter_dir, tmp_path)
    assert set(written) == {"unet", "text_encoder"}
    pipe = tp.load_pipeline(t.base_dir)
    peft_unet = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), written["unet"], is_trainable=True)
    peft_te = PeftModel.from_pretrained(copy.deepcopy(pipe.text_encoder), written["text_encoder"])
    pipe.load_delora_weights(t.adapter_dir)
    with torch.no_grad():
        args = _unet_inputs(pipe.unet)
        torch.testing.assert_close(peft_unet(*args).sample, pipe.unet(*args).sample, atol=1e-5, rtol=0)
        ids = torch.arange(10).reshape(1, 10)
        torch.testing.assert_close(peft_te(ids)[0], pipe.text_encoder(ids)[0], atol=1e-5, rtol=0)
    assert any(p.requires_grad for n, p in peft_unet.named_parameters() if "delora_A" in n)
    # and back: the PEFT directory loads into our pipeline again
    again = tp.load_pipeline(t.base_dir)
    again.load_delora_weights(written["unet"])
    again.load_delora_weights(written["text_encoder"], adapter_name="te")
    with torch.no_grad():
        torch.testing.assert_close(again.unet(*args).sample, pipe.unet(*args).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(again.text_encoder(ids)[0], pipe.text_encoder(ids)[0], atol=1e-5, rtol=0)


def test_diffusers_export_names_clip_layers_as_every_reader_maps(trained):
    """transformers 5's CLIPTextModel has no ``text_model`` level; ComfyUI maps only the prefixed names
    (diffusers strips the prefix again, as the load tests above show)."""
    state = export.to_lora_state_dict(io.load_adapter(trained("sdxl").adapter_dir), "diffusers")
    encoder_keys = [k for k in state if k.startswith("text_encoder")]
    assert encoder_keys and all(
        k.startswith(("text_encoder.text_model.encoder.layers.", "text_encoder_2.text_model.encoder.layers."))
        for k in encoder_keys
    )
