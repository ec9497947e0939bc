"""pipe.load_delora_weights & co on real tiny diffusers pipelines of every family, loaded with from_pretrained."""

from __future__ import annotations

import copy

import pytest
import tiny_pipelines as tp
import torch
from conftest import PARTIAL_SCALE, inject_family_adapter, make_nontrivial, max_diff

import delora_diffusion as dd
from delora_diffusion import functional, io


def denoiser(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


EXACT = 1e-6  # the same computation in a fresh pipeline: equal up to float noise
RESTORED = 2e-5  # unfusing subtracts the update again: float rounding of the weights
FUSED = 2e-3  # fusing changes the order of float operations


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_save_load_scale_fuse_unload(family, trained):
    t = trained(family)
    pipe = tp.load_pipeline(t.base_dir)
    assert max_diff(tp.run(pipe, family), t.base) < EXACT
    name = pipe.load_delora_weights(t.adapter_dir)
    assert name == "default"
    assert set(pipe.get_list_delora_adapters()) == set(
        {"sd": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"]}.get(
            family, ["transformer", "text_encoder"] + (["text_encoder_2"] if family == "sd3" else [])
        )
    )
    # save -> load in a fresh pipeline gives the images of the pipeline that saved it
    adapted = tp.run(pipe, family)
    assert max_diff(adapted, t.adapted) < EXACT
    assert max_diff(adapted, t.base) > 1e-3, "the adapter should visibly change the images"
    # scale 0 is the base model; scale s is the lambda-scaled adapter; the context manager restores
    with pipe.delora_scale(0.0):
        assert max_diff(tp.run(pipe, family), t.base) < EXACT
    pipe.set_delora_scale(PARTIAL_SCALE)
    assert max_diff(tp.run(pipe, family), t.partial) < EXACT
    pipe.set_delora_scale(1.0)
    # fuse matches unfused; unfuse restores
    weights = {n: p.detach().clone() for n, p in pipe.components[denoiser(pipe)].named_parameters()}
    pipe.fuse_delora()
    assert max_diff(tp.run(pipe, family), adapted) < FUSED
    pipe.unfuse_delora()
    for name, param in pipe.components[denoiser(pipe)].named_parameters():
        torch.testing.assert_close(param.detach(), weights[name], atol=1e-6, rtol=1e-5)
    # metadata travelled with the file
    meta = pipe.get_delora_metadata()
    assert meta["training_args"] == {"learning_rate": 1e-3, "family": family}
    assert meta["format_version"] == io.FORMAT_VERSION
    assert meta["configs"][next(iter(meta["configs"]))]["init"] == (
        "paper" if family in ("sd", "sdxl") else "zero"
    )
    # unload restores the base
    pipe.unload_delora_weights()
    assert pipe.get_list_delora_adapters() == {}
    assert max_diff(tp.run(pipe, family), t.base) < RESTORED


def test_fuse_with_scale_and_disable_enable(trained):
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(t.adapter_dir / io.WEIGHT_NAME)  # a .safetensors file works too
    pipe.fuse_delora(scale=PARTIAL_SCALE, components=["unet", "text_encoder"])
    assert max_diff(tp.run(pipe), t.partial) < FUSED
    pipe.unfuse_delora()
    assert max_diff(tp.run(pipe), t.adapted) < RESTORED  # the scale before fusing is back
    pipe.disable_delora()
    assert max_diff(tp.run(pipe), t.base) < RESTORED
    pipe.enable_delora()
    assert max_diff(tp.run(pipe), t.adapted) < RESTORED
    with pytest.raises(ValueError, match="Unknown components"):
        pipe.fuse_delora(components=["vae"])


def _subject_and_style(t, style_dir):
    """A pipeline with the trained adapter as "subject" and a second one, saved to `style_dir`, as "style"."""
    other = tp.load_pipeline(t.base_dir)
    inject_family_adapter(other, "sd", adapter_name="style", seed=7, lam=0.8)
    other.save_delora_weights(style_dir)
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(t.adapter_dir, adapter_name="subject")
    pipe.load_delora_weights(style_dir)
    return pipe


def test_two_adapters_with_weights_match_summed_weight_updates(trained, tmp_path):
    """Reference built independently: add w_a*dW_a + w_b*dW_b (from the files' tensors) to the base weights."""
    t = trained("sd")
    pipe = _subject_and_style(t, tmp_path)
    assert pipe.get_list_delora_adapters()["unet"] == ["subject", "style"]
    pipe.set_delora_adapters(["subject", "style"], [0.5, 1.5])
    together = tp.run(pipe)

    reference = tp.load_pipeline(t.base_dir)
    for path, weight in ((t.adapter_dir, 0.5), (tmp_path, 1.5)):
        tensors, _ = io.read_delora_file(path / io.WEIGHT_NAME)
        for component, comp_tensors in tensors.items():
            module = getattr(reference, component)
            for layer, named in io.split_layers(comp_tensors).items():
                base = module.get_submodule(layer)
                delta = functional.delta_weight(
                    named["delora_A"], named["delora_B"], named["delora_lambda"], named["delora_w_norm"],
                    named["delora_A"].shape[0], weight, named.get("delora_A0"), named.get("delora_B0"),
                )  # fmt: skip
                with torch.no_grad():
                    base.weight.add_(delta.reshape(base.weight.shape))
    assert max_diff(together, tp.run(reference)) < FUSED
    assert max_diff(together, t.adapted) > 1e-3
    # only one of them active
    pipe.set_delora_adapters("subject")
    assert max_diff(tp.run(pipe), t.adapted) < EXACT


def test_img2img_and_inpaint_siblings(trained):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    t = trained("sd")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    for cls, extra in (
        (StableDiffusionImg2ImgPipeline, {"image": image, "strength": 1.0}),
        (StableDiffusionInpaintPipeline, {"image": image, "mask_image": mask, "strength": 1.0}),
    ):
        pipe = tp.load_pipeline(t.base_dir, cls)
        base = tp.run(pipe, "sd", **extra)
        pipe.load_delora_weights(t.adapter_dir)
        adapted = tp.run(pipe, "sd", **extra)
        assert max_diff(adapted, base) > 1e-3
        with pipe.delora_scale(0.0):
            assert max_diff(tp.run(pipe, "sd", **extra), base) < EXACT


def test_report_and_metadata_for_the_app(trained):
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(t.adapter_dir)
    rows = pipe.delora_report()
    assert {r["component"] for r in rows} == {"unet", "text_encoder"}
    for row in rows:
        assert {"layer", "rank", "lambda", "bound", "relative_delta", "scale"} <= set(row)
        assert ".base_layer" not in row["layer"]
        assert 0 < row["delta_norm"] <= row["bound"] * (1 + 1e-5)
    pipe.set_delora_scale(0.5)
    half = pipe.delora_report()
    assert half[0]["scale"] == 0.5
    assert half[0]["delta_norm"] == pytest.approx(rows[0]["delta_norm"] * 0.5, rel=1e-4)
    meta = pipe.get_delora_metadata("default")
    assert meta["base_model"] == t.base_dir.name
    assert meta["pipeline_class"] == "StableDiffusionPipeline"
    assert meta["component_classes"] == {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel"}


def test_state_dict_source_and_adapter_name_clash(trained):
    t = trained("sd")
    tensors, _ = io.read_delora_file(t.adapter_dir / io.WEIGHT_NAME)
    state_dict = {f"{c}.{k}": v for c, comp in tensors.items() for k, v in comp.items()}
    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights(state_dict)
    assert max_diff(tp.run(pipe), t.adapted) < EXACT
    with pytest.raises(ValueError, match="already has a DeLoRA adapter named 'default'"):
        pipe.load_delora_weights(t.adapter_dir)
    # the slider at s is the adapter with lambda multiplied by s (built here by editing the tensors)
    scaled = {k: v * PARTIAL_SCALE if k.endswith("delora_lambda") else v for k, v in state_dict.items()}
    pipe.unload_delora_weights()
    pipe.load_delora_weights(scaled)
    assert max_diff(tp.run(pipe), t.partial) < EXACT
    with pytest.raises(ValueError, match="No DeLoRA adapter named 'nope'"):
        pipe.set_delora_scale(0.5, "nope")


def test_t5_encoder_adapter_round_trip(pipeline_dir, tmp_path):
    """T5 text encoders (Flux's text_encoder_2) carry adapters too; checked on the encoder's output."""
    pipe = tp.load_pipeline(pipeline_dir("flux"))
    ids = torch.arange(12).reshape(1, 12) % tp.T5_VOCAB_SIZE
    base = pipe.text_encoder_2(ids)[0]
    dd.inject_delora(pipe.text_encoder_2, dd.DeLoRAConfig(rank=2, lambda_init=1.0))
    make_nontrivial(pipe.text_encoder_2)
    adapted = pipe.text_encoder_2(ids)[0]
    pipe.save_delora_weights(tmp_path)
    fresh = tp.load_pipeline(pipeline_dir("flux"))
    fresh.load_delora_weights(tmp_path)
    assert fresh.get_list_delora_adapters() == {"text_encoder_2": ["default"]}
    # The fresh pipeline folds its scales without gradients, the trained one with: a few float32 ulps at
    # T5's output scale (about 1.6), so relative to it as well.
    torch.testing.assert_close(fresh.text_encoder_2(ids)[0], adapted, atol=EXACT, rtol=EXACT)
    assert (adapted - base).abs().max() > 1e-3


def test_hub_repo_id_through_an_offline_cache(trained, tmp_path, monkeypatch):
    """A cache laid out like the hub's (models--org--name/snapshots/<rev>/, refs/main), with offline mode on."""
    import huggingface_hub.constants

    t = trained("sd")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-delora"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / io.WEIGHT_NAME).write_bytes((t.adapter_dir / io.WEIGHT_NAME).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    pipe = tp.load_pipeline(t.base_dir)
    pipe.load_delora_weights("someone/tiny-delora", cache_dir=str(tmp_path / "hub"))
    assert max_diff(tp.run(pipe), t.adapted) < EXACT
    with pytest.raises(FileNotFoundError, match="someone/not-there"):
        pipe.load_delora_weights("someone/not-there", adapter_name="x", cache_dir=str(tmp_path / "hub"))


def test_coexists_with_diffusers_lora_in_either_order(trained, tmp_path):
    """Both apply: the layer output is base + LoRA update + DeLoRA update; each unloads without the other."""
    from peft import LoraConfig, get_peft_model_state_dict

    t = trained("sd")
    lora_pipe = tp.load_pipeline(t.base_dir)
    lora_pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False)
    )
    lora_state = get_peft_model_state_dict(lora_pipe.unet)
    lora_pipe.save_lora_weights(tmp_path, unet_lora_layers=lora_state, safe_serialization=True)

    layer_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    pipes = {}
    for order in ("lora_first", "delora_first"):
        pipe = tp.load_pipeline(t.base_dir)
        base_out = pipe.unet.get_submodule(layer_name)(x)
        steps = [lambda p: p.load_lora_weights(tmp_path), lambda p: p.load_delora_weights(t.adapter_dir)]
        for step in steps if order == "lora_first" else steps[::-1]:
            step(pipe)
        layer = pipe.unet.get_submodule(layer_name)
        with torch.no_grad():
            both = layer(x)
            pipe.disable_delora()
            lora_only = layer(x)
            pipe.enable_delora()
            pipe.disable_lora()
            delora_only = layer(x)
            pipe.enable_lora()
        torch.testing.assert_close(
            both - base_out, (lora_only - base_out) + (delora_only - base_out), atol=1e-5, rtol=0
        )
        assert (lora_only - base_out).abs().max() > 1e-3 and (delora_only - base_out).abs().max() > 1e-3
        pipes[order] = pipe
    images = {order: tp.run(pipe) for order, pipe in pipes.items()}
    assert max_diff(images["lora_first"], images["delora_first"]) < EXACT
    # each unloads without touching the other
    pipe = pipes["lora_first"]
    pipe.unload_lora_weights()
    assert max_diff(tp.run(pipe), t.adapted) < RESTORED
    pipe = pipes["delora_first"]
    pipe.unload_delora_weights()
    pipe.load_delora_weights(t.adapter_dir)  # and back, now on top of the LoRA wrappers
    assert max_diff(tp.run(pipe), images["lora_first"]) < RESTORED
    # saving while a LoRA wraps the layers writes the same canonical names
    pipe.save_delora_weights(tmp_path / "resaved")
    resaved, _ = io.read_delora_file(tmp_path / "resaved" / io.WEIGHT_NAME)
    assert not any(".base_layer" in k for comp in resaved.values() for k in comp)


def test_loaded_adapters_are_frozen_and_base_trainability_is_untouched(trained):
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    before = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    pipe.load_delora_weights(t.adapter_dir)
    after = {n: p.requires_grad for n, p in pipe.unet.named_parameters() if "delora" not in n}
    assert after == before
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "delora" in n)
    assert copy.deepcopy(pipe.unet) is not None


def test_loading_onto_a_different_base_warns_but_loads(trained):
    """Same architecture, other weights (a fine-tuned base): column norms differ from the recorded w."""
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    with torch.no_grad():
        pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight.mul_(2.0)
    with pytest.warns(UserWarning, match="1 of 32 unet layers have column norms that differ"):
        pipe.load_delora_weights(t.adapter_dir)
    assert pipe.get_list_delora_adapters()["unet"] == ["default"]


def test_save_and_metadata_need_a_name_when_ambiguous(trained, tmp_path):
    """With no adapter, or several, saving and describing say which name to pass instead of guessing."""
    t = trained("sd")
    pipe = tp.load_pipeline(t.base_dir)
    with pytest.raises(ValueError, match="no DeLoRA adapter to save"):
        pipe.save_delora_weights(tmp_path / "none")
    assert not (tmp_path / "none").exists()
    pipe.load_delora_weights(t.adapter_dir, adapter_name="one")
    pipe.load_delora_weights(t.adapter_dir, adapter_name="two")
    with pytest.raises(ValueError, match=r"adapters \['one', 'two'\]; pass adapter_name"):
        pipe.save_delora_weights(tmp_path / "both")
    with pytest.raises(ValueError, match="pass adapter_name"):
        pipe.get_delora_metadata()
    assert pipe.save_delora_weights(tmp_path / "two", adapter_name="two").exists()
    assert pipe.get_delora_metadata("one")


# --- diffusers' names (issue 14 item 6) --------------------------------------------------------------------
def test_diffusers_argument_names_and_adapter_management(trained, tmp_path):
    t = trained("sd")
    pipe = _subject_and_style(t, tmp_path)
    assert pipe.get_active_delora_adapters() == ["subject", "style"]
    # set_adapters(adapter_names, adapter_weights=...) as diffusers takes it, per-component dicts included
    pipe.set_delora_adapters(["subject", "style"], adapter_weights=[1.0, 0.0])
    assert max_diff(tp.run(pipe), t.adapted) < EXACT
    pipe.set_delora_adapters(
        ["subject"], adapter_weights=[{"unet": PARTIAL_SCALE, "text_encoder": PARTIAL_SCALE}]
    )
    assert pipe.get_active_delora_adapters() == ["subject"]
    assert max_diff(tp.run(pipe), t.partial) < EXACT
    pipe.set_delora_adapters("subject", adapter_weights={"unet": PARTIAL_SCALE})  # text_encoder keeps 1.0
    unet_only = tp.run(pipe)
    assert max_diff(unet_only, t.partial) > 1e-4 and max_diff(unet_only, t.adapted) > 1e-4
    with pytest.raises(ValueError, match=r"unknown components \['vae'\]"):
        pipe.set_delora_adapters("subject", adapter_weights={"vae": 0.5})
    pipe.set_delora_adapters("subject", weights=[1.0])  # the older keyword still works
    # fuse_lora(lora_scale=...) is the scale
    pipe.fuse_delora(lora_scale=PARTIAL_SCALE)
    assert max_diff(tp.run(pipe), t.partial) < FUSED
    pipe.unfuse_delora()
    with pytest.raises(ValueError, match="pass one of them"):
        pipe.fuse_delora(scale=0.5, lora_scale=0.7)
    # delete by name (fused or not), unload one by name, unload all
    pipe.set_delora_adapters(["subject", "style"])
    pipe.fuse_delora(adapter_names=["style"])
    pipe.delete_delora_adapters("style")
    assert pipe.get_list_delora_adapters() == {"unet": ["subject"], "text_encoder": ["subject"]}
    assert max_diff(tp.run(pipe), t.adapted) < RESTORED
    with pytest.raises(ValueError, match="No DeLoRA adapter named 'style'"):
        pipe.delete_delora_adapters(["style"])
    pipe.load_delora_weights(tmp_path)
    pipe.unload_delora_weights(adapter_name="style")
    assert pipe.get_active_delora_adapters() == ["subject"]
    assert "style" not in pipeline_metadata_names(pipe)
    pipe.unload_delora_weights()
    assert pipe.get_list_delora_adapters() == {} and pipe.get_active_delora_adapters() == []
    assert max_diff(tp.run(pipe), t.base) < RESTORED


def pipeline_metadata_names(pipe) -> list[str]:
    from delora_diffusion import pipeline

    return list(pipeline._metadata_store(pipe))
