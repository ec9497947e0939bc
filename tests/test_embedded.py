"""The embedded default: the procedural world, its tokenizer, the bundled subjects, probe and base model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from delora_diffusion.embedded import (
    MODEL_DIR,
    default_model_path,
    default_subject,
    list_subjects,
    load_probe,
    load_subject,
    world,
)
from delora_diffusion.embedded.evaluate import attribute_accuracy, eval_scenes
from delora_diffusion.embedded.subjects import write_subjects
from delora_diffusion.embedded.tokenizer import make_tokenizer


def test_world_is_deterministic_from_seed():
    a, scenes_a = world.render_dataset(6, seed=3)
    b, scenes_b = world.render_dataset(6, seed=3)
    c, _ = world.render_dataset(6, seed=4)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_captions_name_every_attribute_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = world.sample_scene(rng)
        assert (scene.shape, scene.color, scene.pattern) not in world.HELD_OUT
        assert world.parse_caption(world.caption(scene)) == scene.attributes()


def test_held_out_triples_only_when_asked():
    rng = np.random.default_rng(0)
    triples = {(s.shape, s.color, s.pattern) for s in (world.sample_scene(rng, True) for _ in range(3000))}
    assert world.HELD_OUT <= triples


def test_attributes_change_the_pixels():
    base = world.Scene("circle", "red", "plain", "white")
    pixels = np.asarray(world.render(base), dtype=np.float32)
    for change in ({"shape": "star"}, {"color": "blue"}, {"pattern": "striped"}, {"background": "cyan"}):
        other = np.asarray(world.render(world.Scene(**{**base.__dict__, **change})), dtype=np.float32)
        assert np.abs(other - pixels).mean() > 2.0, change


def test_tokenizer_keeps_world_words_whole(tmp_path):
    tok = make_tokenizer(tmp_path)
    for word in world.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("an unseen zebra", add_special_tokens=False).input_ids) > 3  # still tokenizes, by bytes
    ids = tok("a photo of sks star").input_ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of sks star"


def test_bundled_subjects_are_novel_and_reproducible(tmp_path):
    names = list_subjects()
    assert len(names) >= 2 and default_subject().name in names
    for name in names:
        subject = load_subject(name)
        a = subject.attributes
        assert (a["shape"], a["color"], a["pattern"]) in world.HELD_OUT  # never seen in base training
        assert a["accent"] in world.COLORS
        assert 4 <= len(subject.image_paths) <= 6 and subject.heldout_paths
        assert subject.instance_prompt == f"a photo of {subject.token} {subject.class_noun}"
        assert subject.token in world.RARE_TOKENS and subject.class_prompt.endswith(subject.class_noun)
        assert all(im.size == (64, 64) and im.mode == "RGB" for im in subject.images())
    write_subjects(tmp_path, seed=0)
    for name in names:
        for path in load_subject(name).image_paths:
            assert (tmp_path / name / path.name).read_bytes() == path.read_bytes()


def test_unknown_subject_names_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match="striped_star"):
        load_subject("no_such_subject")


def test_probe_reads_fresh_renders():
    probe = load_probe()
    scenes = eval_scenes(120, seed=7)
    predicted = probe.predict([world.render(s) for s in scenes])
    accuracy = attribute_accuracy(predicted, scenes)
    assert min(accuracy[a] for a in world.ATTRIBUTES) >= 0.95, accuracy


def test_probe_embedding_tells_subjects_apart():
    probe = load_probe()
    star, square = (load_subject(n) for n in ("striped_star", "dotted_square"))
    e_star_train, e_star_held = probe.embed(star.images()), probe.embed(star.heldout_images())
    e_square = probe.embed(square.heldout_images())
    same = (e_star_train @ e_star_held.T).mean()
    other = (e_star_train @ e_square.T).mean()
    assert same > other + 0.1, (float(same), float(other))
    for subject in (star, square):
        predicted = probe.predict(subject.images() + subject.heldout_images())
        for attribute in ("shape", "color", "pattern"):
            assert set(predicted[attribute]) == {subject.attributes[attribute]}, (subject.name, predicted)
        # The accent head is the probe's weakest (thin marks on a small object are sometimes missed).
        hits = [v == subject.attributes["accent"] for v in predicted["accent"]]
        assert sum(hits) >= 2 * len(hits) / 3, (subject.name, predicted["accent"])


def test_bundled_vae_can_draw_every_subject():
    """DreamBooth can only teach what the VAE can decode: the subject's colours and marks must survive the
    round trip (thin red-and-yellow stripes once came back orange, so no run could ever get them right)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(default_model_path(), subfolder="vae").eval()
    probe = load_probe()
    for name in list_subjects():
        subject = load_subject(name)
        x = world.to_tensor(subject.images() + subject.heldout_images())
        with torch.no_grad():
            decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        predicted = probe.predict(decoded)
        for attribute in ("shape", "color", "pattern", "accent"):
            hits = [v == subject.attributes[attribute] for v in predicted[attribute]]
            assert sum(hits) >= 0.75 * len(hits), (name, attribute, predicted[attribute])


def test_bundled_model_loads_with_from_pretrained_and_follows_prompts():
    from diffusers import StableDiffusionPipeline

    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30e6
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    scenes = eval_scenes(16, seed=1)
    images = pipe(
        [world.caption(s) for s in scenes],
        num_inference_steps=15,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (16, 3, 64, 64)
    accuracy = attribute_accuracy(load_probe().predict(images * 2 - 1), scenes)
    # The full measurement (200 captions, 25 steps, guidance 7.5) is in benchmarks/RESULTS.md; 16 captions are a smoke
    # test with room for sampling noise, but a model that ignores its prompt scores ~20-33% here.
    assert min(accuracy[a] for a in world.ATTRIBUTES) >= 0.75, accuracy


def test_short_default_run_through_accelerate_launch(tmp_path):
    """The README's main job, cut to a few steps: no flags but the output dir and the step count."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import delora_diffusion
    from delora_diffusion.io import read_delora_file

    out = tmp_path / "run"
    script = Path(__file__).resolve().parents[1] / "train_scripts" / "dreambooth_delora.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--mixed_precision", "no", str(script), "--output_dir", str(out), "--max_train_steps", "4"]
    cmd += ["--validation_inference_steps", "2", "--num_validation_images", "1"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, meta = read_delora_file(out / delora_diffusion.io.WEIGHT_NAME)
    args = meta["training_args"]  # what a user would share: folder names, never this machine's paths
    assert args["pretrained_model_name_or_path"] == default_model_path().name
    assert args["instance_data_dir"] == default_subject().path.name
    assert args["instance_prompt"] == default_subject().instance_prompt
    local = json.loads((out / "training_args.json").read_text())  # the full paths stay local
    assert Path(local["pretrained_model_name_or_path"]).resolve() == default_model_path().resolve()
    assert Path(local["instance_data_dir"]).resolve() == default_subject().path.resolve()
    card = (out / "README.md").read_text()
    assert "sks" in card and "load_delora_weights" in card
    from delora_diffusion.training.args import DEFAULT_RELATIVE_BOUND

    rho = DEFAULT_RELATIVE_BOUND  # the default run trains under the relative bound, recorded in file and card
    assert meta["configs"]["unet"]["relative_bound"] == rho and f"relative bound rho {rho:g}" in card
    assert (out / "validation" / "lambda_sweep.png").exists()
    contexts = Image.open(out / "validation" / "prompts.png")  # the subject on every background, one row each
    assert contexts.size == (64, 64 * len(world.BACKGROUNDS)) and "prompts.png" in card
    assert json.loads((out / "training_args.json").read_text())["max_train_steps"] == 4

    # The scoring script of RESULTS.md's default-run table reads this run (cut to 2 sampling steps).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import default_run

    scores = default_run.main([str(out), "--per_prompt", "1", "--inference_steps", "2", "--threads", "1"])
    assert set(scores) >= {"subject_similarity", "color_accuracy", "background_accuracy", "drift"}
    assert 0 < scores["drift"] < 0.5 and -1 <= scores["subject_similarity"] <= 1
