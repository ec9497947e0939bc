"""Hostile and malformed adapter files (issue 13): nothing a file says is run, absurd bounds are refused, every
malformed header or metadata value is the library's DeLoRAFileError, and a failed load changes nothing."""

from __future__ import annotations

import json
import multiprocessing
import struct
import time
from datetime import timedelta
from pathlib import Path

import pytest
import tiny_pipelines as tp
import torch
from conftest import max_diff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_io import LAYER, assert_unchanged, rewrite, snapshot

import delora_diffusion as dd
from delora_diffusion import io

CATASTROPHIC = "([\\w.]+)+#"
"""Exponential backtracking on any dotted layer name: minutes per module name if it were ever matched."""


def _with_config(**fields):
    def edit(meta: dict) -> dict:
        configs = json.loads(meta["delora_configs"])
        configs["unet"].update(fields)
        return {**meta, "delora_configs": json.dumps(configs)}

    return edit


def _load_in_child(path: str, base_dir: str, conn) -> None:  # runs in a forked process
    try:
        pipe = tp.load_pipeline(base_dir)
        pipe.load_delora_weights(path)
        conn.send("loaded")
    except Exception as err:  # reported to the parent, which decides
        conn.send(f"{type(err).__name__}: {err}")


def test_target_patterns_from_a_file_are_never_run(trained, good_file, tmp_path):
    """A crafted regex in the recorded config (targets, excludes, rank patterns) costs nothing at load.

    The load runs in a forked child with a time limit, so a regression fails this test instead of hanging it.
    """
    edit = _with_config(
        target_modules=CATASTROPHIC, exclude_modules=[CATASTROPHIC], rank_pattern={CATASTROPHIC: 3}
    )
    bad = rewrite(good_file, tmp_path / "crafted" / io.WEIGHT_NAME, metadata=edit)
    t = trained("sd")
    parent, child = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_load_in_child, args=(str(bad), str(t.base_dir), child)
    )
    start = time.monotonic()
    process.start()
    finished = parent.poll(120)
    if not finished:
        process.kill()
    process.join(10)
    assert finished, "loading a file with a crafted target pattern did not finish in 120 s"
    assert parent.recv() == "loaded"
    assert time.monotonic() - start < 120
    pipe = tp.load_pipeline(t.base_dir)  # known to be fast now: the adapter works as saved
    pipe.load_delora_weights(bad)
    assert max_diff(tp.run(pipe), t.adapted) < 1e-6
    meta = pipe.get_delora_metadata()
    assert meta["configs"]["unet"]["target_modules"] == CATASTROPHIC  # kept as information only


def test_absurd_lambda_is_refused_at_load_naming_the_layer(sd_pipe, good_file, tmp_path):
    huge = {f"unet.{LAYER}.delora_lambda": torch.tensor([1e30])}
    bad = rewrite(good_file, tmp_path / "huge" / io.WEIGHT_NAME, lambda s: {**s, **huge})
    before = snapshot(sd_pipe)
    with pytest.raises(io.DeLoRAFileError, match=rf"layer unet\.{LAYER} has lambda 1e\+30.*limit is 1000"):
        sd_pipe.load_delora_weights(bad)
    assert_unchanged(sd_pipe, before)
    tensors, _ = io.read_delora_file(good_file)
    state = {f"{c}.{k}": v for c, comp in tensors.items() for k, v in comp.items()}
    with pytest.raises(io.DeLoRAFileError, match=rf"unet\.{LAYER} has lambda 1e\+30"):
        sd_pipe.load_delora_weights({**state, **huge})  # a state dict goes through the same check
    assert_unchanged(sd_pipe, before)


def test_absurd_lambda_is_refused_at_save(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, lambda_init=2.0, target_modules=["0", "1"]))
    path = io.save_delora_file(tmp_path / "ok.safetensors", {"unet": model})  # ordinary lambdas save
    assert io.read_delora_file(path)[1]["layers"] == {"unet": ["0", "1"]}
    with torch.no_grad():
        model[1].delora.default.delora_lambda.fill_(1e30)
    with pytest.raises(io.DeLoRAFileError, match=r"layer unet\.1 has lambda 1e\+30.*refusing to save"):
        io.save_delora_file(tmp_path / "bad.safetensors", {"unet": model})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]
    assert io.MAX_FILE_RELATIVE_BOUND == 1e3


# --- malformed headers and metadata --------------------------------------------------------------------------
def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _float8_state(good_file: Path) -> dict[str, torch.Tensor]:
    tensors, _ = io.read_delora_file(good_file)
    state = {f"{c}.{k}": v for c, comp in tensors.items() for k, v in comp.items()}
    state[f"unet.{LAYER}.delora_A"] = state[f"unet.{LAYER}.delora_A"].to(torch.float8_e4m3fn)
    return state


MALFORMED = {
    # case: (edit of (header, metadata), expected message)
    "metadata_is_a_list": (lambda h, m: {**h, "__metadata__": ["x"]}, "__metadata__ is not a map of strings"),
    "components_is_a_map": (lambda h, m: m.update(delora_components='{"unet": 1}'), "'delora_components': expected a list"),
    "configs_is_a_list": (lambda h, m: m.update(delora_configs="[]"), "'delora_configs': expected a map of configs"),
    "classes_is_a_list": (lambda h, m: m.update(delora_component_classes='["x"]'), "'delora_component_classes'"),
    "training_args_number": (lambda h, m: m.update(delora_training_args="5"), "'delora_training_args': expected an object"),
    "conv_shapes_strings": (lambda h, m: m.update(delora_conv_shapes='{"unet": {"a": "x"}}'), "'delora_conv_shapes'"),
    "conv_shapes_wrong": (lambda h, m: m.update(delora_conv_shapes=json.dumps({"unet": {LAYER: [2, 2, 2, 2]}})), "conv kernel shape"),
    "rank_pattern_list": (lambda h, m: m.update(delora_configs=json.dumps({**json.loads(m["delora_configs"]), "unet": {"rank_pattern": ["x"]}})), "invalid DeLoRAConfig"),
    "adapter_name_dot": (lambda h, m: m.update(delora_adapter_name="a.b"), "adapter name 'a.b'"),
    "string_offsets": (lambda h, m: h[f"unet.{LAYER}.delora_A"].update(data_offsets="ab"), "data_offsets 'ab' are not two integers"),
    "bool_shape": (lambda h, m: h[f"unet.{LAYER}.delora_lambda"].update(shape=[True]), "is not a list of sizes"),
    "entry_is_a_string": (lambda h, m: h.update({f"unet.{LAYER}.delora_A": "x"}), "not an object"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_values_give_the_library_error(case, sd_pipe, good_file, tmp_path):
    header, data = _split(good_file)
    edit, message = MALFORMED[case]
    edited = edit(header, header["__metadata__"]) or header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_join(edited, data))
    before = snapshot(sd_pipe)
    with pytest.raises(io.DeLoRAFileError, match=message):
        sd_pipe.load_delora_weights(bad)
    assert_unchanged(sd_pipe, before)


def test_float8_tensors_give_the_library_error(sd_pipe, good_file, tmp_path):
    state = _float8_state(good_file)
    bad = tmp_path / "f8.safetensors"
    metadata = {**io.read_safetensors_header(good_file)[1], "delora_checksum": io.tensor_checksum(state)}
    save_file(state, str(bad), metadata=metadata)
    before = snapshot(sd_pipe)
    with pytest.raises(io.DeLoRAFileError, match=rf"unet\.{LAYER}\.delora_A' has dtype F8_E4M3"):
        sd_pipe.load_delora_weights(bad)
    with pytest.raises(io.DeLoRAFileError, match=rf"unet\.{LAYER}\.delora_A has dtype torch.float8_e4m3fn"):
        sd_pipe.load_delora_weights(state)
    assert_unchanged(sd_pipe, before)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_META_KEYS = [
    "delora_format", "delora_format_version", "delora_adapter_name", "delora_components",
    "delora_component_classes", "delora_configs", "delora_layers", "delora_w_norm_fingerprint",
    "delora_training_args", "delora_conv_shapes", "delora_checksum", "delora_base_model",
]  # fmt: skip
_CONFIG_FIELDS = ["rank", "lambda_init", "init", "target_modules", "exclude_modules", "rank_pattern", "dtype"]
_MUTATION = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(_META_KEYS), _JSON.map(json.dumps) | st.text(max_size=8)),
    st.tuples(st.just("meta_raw"), st.sampled_from(_META_KEYS), _JSON),
    st.tuples(st.just("config"), st.sampled_from(_CONFIG_FIELDS), _JSON),
    st.tuples(st.just("entry"), st.sampled_from(["dtype", "shape", "data_offsets"]), _JSON | st.sampled_from(["F8_E4M3", "I64", "BOOL", "ab"])),
    st.tuples(st.just("metadata"), st.just(""), _JSON),
)  # fmt: skip


def _mutate(header: dict, mutation: tuple) -> None:
    """Apply one edit; an edit that an earlier one made meaningless (no metadata map left) is skipped."""
    kind, key, value = mutation
    meta = header["__metadata__"]
    if kind != "metadata" and not isinstance(meta, dict):
        return
    if kind in ("meta", "meta_raw"):
        meta[key] = value
    elif kind == "config":
        try:
            configs = json.loads(meta["delora_configs"])
            configs["unet"][key] = value
        except (KeyError, TypeError, ValueError):
            return
        meta["delora_configs"] = json.dumps(configs)
    elif kind == "entry":
        header[f"unet.{LAYER}.delora_A"][key] = value
    else:
        header["__metadata__"] = value


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=60,
    deadline=timedelta(seconds=10),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=3))
def test_fuzzed_headers_and_metadata_give_the_library_error(mutations, sd_pipe, good_file, fuzz_dir):
    """Any header or metadata value of any JSON type: the load works or raises DeLoRAFileError, and a failed
    load leaves the pipeline exactly as it was."""
    header, data = _split(good_file)
    for mutation in mutations:
        _mutate(header, mutation)
    path = fuzz_dir / "fuzzed.safetensors"
    path.write_bytes(_join(header, data))
    before = snapshot(sd_pipe)
    try:
        sd_pipe.load_delora_weights(path, adapter_name="fuzzed")
    except io.DeLoRAFileError:
        pass
    else:
        sd_pipe.unload_delora_weights()
    assert_unchanged(sd_pipe, before)
