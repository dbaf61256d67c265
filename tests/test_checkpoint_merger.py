"""The Checkpoint Merger (A1111's tab): weighted sum, add difference and no interpolation over real checkpoints (the
shapes-64 folder, fine-tuned copies of it saved as single files), written tensor by tensor. Proven by the formulas
key for key, by the A + 1 (B - A) round trip giving B exactly, by a merged file loading and generating, and by
refusals that leave the folder as it was."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.errors import UserError
from app.lora.names import TEXT_ENCODER, UNET
from app.models import streamed_safetensors
from app.models.ldm_export import export_sd1, vae_to_ldm
from app.models.manager import read_pipeline
from app.models.merger import MergerOptions, Source, merge_checkpoints
from app.models.streamed_safetensors import Entry, StreamedReader, write_streamed
from tests.conftest import make_data_dir
from tests.test_lora import gen, pixels
from tests.test_lora_extract import CHANGES, save_tuned

OTHER = [
    (UNET, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2),
    (TEXT_ENCODER, "encoder.layers.1.mlp.fc2", 1),
]


@pytest.fixture(scope="module")
def merger(tmp_path_factory, model_store):
    """Services over shapes-64 (a diffusers folder) and shapes-xl, with two fine-tuned copies of shapes-64 as fp32
    single files: `tuned` (CHANGES) and `other` (other layers)."""
    from app.services import build_services
    from app.settings import Settings

    data = make_data_dir(tmp_path_factory.mktemp("merger"), model_store, ("shapes-64", "shapes-xl"))
    services = build_services(Settings(data_dir=data))
    services.select_checkpoint("shapes-64")
    save_tuned(services, "tuned", CHANGES, size=0.5)
    save_tuned(services, "other", OTHER, size=0.5)
    return services


def base_tensors(services) -> dict[str, torch.Tensor]:
    return export_sd1(read_pipeline(services.models.find("shapes-64"), torch.float32))


def checkpoint(services, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = services.settings.ckpt_dir / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata() or {}


def listing(services) -> list[str]:
    return sorted(p.name for p in services.settings.ckpt_dir.iterdir())


def test_weighted_sum_is_a1111s_formula_and_name(merger):
    path, report = merger.merge_checkpoints(
        MergerOptions("shapes-64", "tuned", interp_method="Weighted sum", multiplier=0.3, save_precision="fp32")
    )
    assert path.name == "0.7(shapes-64) + 0.3(tuned).safetensors"  # A1111's generated name
    assert any(c.path == path for c in merger.models.checkpoints)  # listed at once
    merged, _ = checkpoint(merger, path.stem)
    a, (b, _) = base_tensors(merger), checkpoint(merger, "tuned")
    assert set(merged) == set(a)
    for key, value in merged.items():
        if key.endswith("position_ids"):
            assert torch.equal(value, a[key])  # an index table: A's, never interpolated
        else:
            torch.testing.assert_close(value, 0.7 * a[key] + 0.3 * b[key], atol=1e-6, rtol=0)
    assert report.merged + report.kept == len(merged) and report.merged > 100
    assert "tensors merged" in report.sentence()


def test_add_difference_moves_a_fine_tune_onto_another_model(merger):
    """A + M (B - C): `other` + 1 (`tuned` - shapes-64) holds both fine-tunes' changes; and with A = C the result
    is B itself, key for key."""
    options = MergerOptions("other", "tuned", "shapes-64", "Add difference", 1.0, "fp32", custom_name="zqboth")
    path, _ = merger.merge_checkpoints(options)
    both, _ = checkpoint(merger, "zqboth")
    base, (tuned, _), (other, _) = base_tensors(merger), checkpoint(merger, "tuned"), checkpoint(merger, "other")
    changed = 0
    for key, value in both.items():
        expected = other[key] + (tuned[key] - base[key]) if not key.endswith("position_ids") else other[key]
        torch.testing.assert_close(value, expected, atol=2e-6, rtol=0)
        changed += bool((value != base[key]).any())
    assert changed >= len(CHANGES) + len(OTHER)
    path, _ = merger.merge_checkpoints(
        MergerOptions("shapes-64", "tuned", "shapes-64", "Add difference", 1.0, "fp32", custom_name="zqsame")
    )
    assert path.name == "zqsame.safetensors"
    same, _ = checkpoint(merger, "zqsame")
    for key, value in same.items():
        torch.testing.assert_close(value, tuned[key], atol=1e-6, rtol=0)


def test_a_merged_checkpoint_loads_and_generates_as_its_weights_say(merger):
    """M = 0 is A: the merged file generates A's image; M = 0.5 generates something between, not A's."""
    merger.merge_checkpoints(
        MergerOptions("tuned", "shapes-64", multiplier=0.0, save_precision="fp32", custom_name="zq0")
    )
    merger.merge_checkpoints(MergerOptions("tuned", "shapes-64", multiplier=0.5, custom_name="zqhalf"))
    images = {}
    try:
        for name in ("tuned", "zq0", "zqhalf", "shapes-64"):
            merger.select_checkpoint(name)
            images[name] = pixels(gen(merger, "a red circle"))
    finally:
        merger.select_checkpoint("shapes-64")
    assert np.array_equal(images["zq0"], images["tuned"])
    assert np.abs(images["tuned"] - images["shapes-64"]).max() > 20  # the fine-tune shows
    assert not np.array_equal(images["zqhalf"], images["tuned"])
    assert not np.array_equal(images["zqhalf"], images["shapes-64"])


def test_an_sdxl_merge_loads_and_generates_as_its_inputs_say(merger):
    """shapes-xl (a diffusers folder) with itself, weighted: the same weights, so the merged single file generates
    shapes-xl's image exactly (fp32), through the shipped shapes-sdxl config."""
    path, report = merger.merge_checkpoints(
        MergerOptions("shapes-xl", "shapes-xl", multiplier=0.5, save_precision="fp32", custom_name="zqxl")
    )
    assert report.merged > 100 and "conditioner.embedders.1.model.text_projection" in load_file(str(path))
    images = {}
    try:
        for name in ("shapes-xl", "zqxl"):
            merger.select_checkpoint(name)
            images[name] = pixels(gen(merger, "a red circle"))
    finally:
        merger.select_checkpoint("shapes-64")
    assert np.abs(images["zqxl"] - images["shapes-xl"]).max() <= 1


def test_no_interpolation_converts_discards_and_bakes_in_a_vae(merger):
    """A alone: fp16, the text encoder's layer 1 discarded by a regular expression, another VAE baked in."""
    vae = read_pipeline(merger.models.find("shapes-64"), torch.float32).vae
    with torch.no_grad():
        for p in vae.parameters():
            p += 0.01
    vae_dir = merger.settings.models_dir / "VAE"
    vae_dir.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), str(vae_dir / "zqvae.safetensors"))  # the diffusers layout: converted
    options = MergerOptions(
        "tuned",
        interp_method="No interpolation",
        discard_weights=r"text_model\.encoder\.layers\.1\.",
        bake_in_vae="zqvae.safetensors",
        custom_name="zqconverted",
    )
    _, report = merger.merge_checkpoints(options)
    converted, metadata = checkpoint(merger, "zqconverted")
    tuned, _ = checkpoint(merger, "tuned")
    assert not any("text_model.encoder.layers.1." in k for k in converted)
    assert report.discarded == sum(1 for k in tuned if "text_model.encoder.layers.1." in k) > 0
    expected_vae = vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    assert report.baked_vae == len(expected_vae)
    for key, value in converted.items():
        if value.dtype.is_floating_point:
            assert value.dtype == torch.float16
        reference = expected_vae.get(key, tuned[key])
        torch.testing.assert_close(value.float(), reference.float().half().float(), atol=0, rtol=0)
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["interp_method"] == "No interpolation" and recipe["bake_in_vae"] == "zqvae.safetensors"
    assert recipe["save_as_half"] is True and recipe["discard_weights"] == options.discard_weights


def test_the_metadata_is_a1111s_recipe_with_the_inputs_own(merger):
    tuned, _ = checkpoint(merger, "tuned")
    save_file(tuned, str(merger.settings.ckpt_dir / "zqtitled.safetensors"), {"modelspec.title": "Titled"})
    options = MergerOptions(
        "shapes-64",
        "zqtitled",
        multiplier=0.25,
        custom_name="zqmeta",
        metadata_json='{"author": "me", "steps": 3}',
    )
    merger.merge_checkpoints(options)
    _, metadata = checkpoint(merger, "zqmeta")
    assert metadata["modelspec.title"] == "Titled"  # copied from the inputs
    assert (metadata["author"], metadata["steps"], metadata["format"]) == ("me", "3", "pt")
    recipe = json.loads(metadata["sd_merge_recipe"])
    a, b = merger.models.find("shapes-64"), merger.models.find("zqtitled")
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"]) == (a.sha256, b.sha256)
    assert recipe["tertiary_model_hash"] is None and a.sha256 and b.sha256
    models = json.loads(metadata["sd_merge_models"])
    assert models[b.sha256]["name"] == "zqtitled.safetensors" and len(models[b.sha256]["legacy_hash"]) == 8
    # a merge of a merge carries the first one's inputs too, as A1111's does
    merger.merge_checkpoints(MergerOptions("zqmeta", "tuned", custom_name="zqmeta2", copy_metadata_fields=False))
    _, again = checkpoint(merger, "zqmeta2")
    assert "modelspec.title" not in again
    nested = json.loads(again["sd_merge_models"])
    assert {a.sha256, b.sha256} < set(nested) and nested[merger.models.find("zqmeta").sha256]["sd_merge_recipe"]
    merger.merge_checkpoints(MergerOptions("tuned", "shapes-64", custom_name="zqbare", save_metadata=False))
    assert checkpoint(merger, "zqbare")[1] == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (MergerOptions("shapes-64", "shapes-xl"), "only models of one family"),
        (MergerOptions("shapes-64", "tuned", interp_method="Add difference"), "needs a tertiary model"),
        (MergerOptions("shapes-64", ""), "needs a secondary model"),
        (MergerOptions("shapes-64", "tuned", multiplier=1.5), "Multiplier must be from 0 to 1"),
        (MergerOptions("shapes-64", "tuned", multiplier=float("nan")), "Multiplier must be"),
        (MergerOptions("shapes-64", "tuned", interp_method="Sigmoid"), "Unknown interpolation method"),
        (MergerOptions("shapes-64", "tuned", discard_weights="model[("), "not a regular expression"),
        (MergerOptions("shapes-64", "tuned", metadata_json="{oops"), "not valid JSON"),
        (MergerOptions("shapes-64", "tuned", metadata_json="[1]"), "must be a JSON object"),
        (MergerOptions("shapes-64", "tuned", bake_in_vae="nope.pt"), "No VAE 'nope.pt'"),
        (MergerOptions("shapes-64", "tuned", custom_name="tuned"), "already exists"),
        (MergerOptions("shapes-64", "tuned", custom_name="../up"), "not a usable file name"),
        (MergerOptions("shapes-64", "missing"), "secondary model 'missing' is not in the checkpoint list"),
        (MergerOptions("shapes-64", "tuned", save_precision="fp8"), "Unknown save precision"),
        (MergerOptions("shapes-64", "zqwide"), "cannot be merged layer by layer"),
    ],
)
def test_what_cannot_be_merged_is_refused_and_nothing_is_written(merger, options, message):
    wide = merger.settings.ckpt_dir / "zqwide.safetensors"
    if not wide.exists():  # a checkpoint whose one text-encoder layer has another shape
        tensors, _ = checkpoint(merger, "tuned")
        key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias"
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
        save_file(tensors, str(wide))
        merger.models.refresh()
    before = listing(merger)
    with pytest.raises(UserError, match=message):
        merger.merge_checkpoints(replace(options, custom_name=options.custom_name or "zqrefused"))
    assert listing(merger) == before


def test_an_interrupted_or_failed_write_leaves_no_file(merger, monkeypatch):
    """Stopped between tensors (Interrupt), or the disk filling half way: no file and no temp file."""
    a, b = (Source(merger.models.find(n), lambda info: None) for n in ("tuned", "other"))
    dst = merger.settings.ckpt_dir / "zqstopped.safetensors"
    before = listing(merger)

    def stop(done: int, total: int) -> None:
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(MergerOptions("tuned", "other"), a, b, None, dst, {}, progress=stop)
    assert listing(merger) == before
    real_open = open

    class Filling:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200_000:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        streamed_safetensors,
        "open",
        lambda p, m: Filling(real_open(p, m)) if "w" in m else real_open(p, m),
        raising=False,
    )
    with pytest.raises(UserError, match=r"No space left on device.*Nothing was changed"):
        merger.merge_checkpoints(MergerOptions("tuned", "other", custom_name="zqfull"))
    assert listing(merger) == before


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=0, max_size=6),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_the_streamed_writer_makes_files_safetensors_reads_back(tmp_path_factory, specs, metadata):
    g = torch.Generator().manual_seed(len(specs))
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        values = torch.randn(shape, generator=g) * 50
        tensors[f"t{i}.weight"] = values.to(dtype) if dtype != torch.bool else values > 0
    dst = tmp_path_factory.mktemp("stream") / "out.safetensors"
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_streamed(dst, entries, lambda e: tensors[e.name], metadata or None)
    back = load_file(str(dst))
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    with safe_open(str(dst), "pt") as f:
        assert (f.metadata() or {}) == (metadata or {})
    assert dst.stat().st_size == len(streamed_safetensors.header(entries, metadata or None)) + sum(
        e.nbytes for e in entries
    )
    reader = StreamedReader(dst)  # our reader reads the library's files and ours alike
    assert reader.metadata == (metadata or {}) and set(reader.entries) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(reader.get(key), value) and reader.get(key).dtype == value.dtype
    with pytest.raises(ValueError, match="declared"):
        write_streamed(dst, [Entry("x", torch.float32, (2,))], lambda e: torch.zeros(3))
    assert load_file(str(dst)).keys() == back.keys()  # the failed write left the old file


def test_merge_through_the_api_then_generate_with_the_new_checkpoint(server):
    """`POST /sdapi/v1/merge/checkpoint` with A1111's argument names; the answer's title selects the new checkpoint
    through `override_settings`. M = 1 gives B itself: the same image as B's."""
    import requests

    from app.models.default_model import build_default_pipeline
    from tests.test_lora_merge import decoded

    pipe = build_default_pipeline()
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].proj_in.weight += 0.3
    save_file(export_sd1(pipe), str(server.data_dir / "models" / "Stable-diffusion" / "zqapituned.safetensors"))
    url = f"{server.url}/sdapi/v1"
    body = dict(
        primary_model_name="shapes-64",
        secondary_model_name="zqapituned",
        interp_method="Weighted sum",
        multiplier=1.0,
        save_precision="fp32",
        custom_name="zqapimerged",
        checkpoint_format="safetensors",
    )
    answer = requests.post(f"{url}/merge/checkpoint", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["path"].endswith("zqapimerged.safetensors") and result["merged"] > 100
    assert result["info"].startswith("Checkpoint saved to ")
    assert result["title"] in [m["title"] for m in requests.get(f"{url}/sd-models", timeout=60).json()]
    txt = dict(prompt="a red circle", steps=2, width=64, height=64, seed=1)
    images = []
    for title in ("zqapituned", result["title"]):
        made = requests.post(
            f"{url}/txt2img", json={**txt, "override_settings": {"sd_model_checkpoint": title}}, timeout=300
        )
        assert made.ok, made.text
        images.append(decoded(made.json()["images"][0]))
    assert np.array_equal(images[0], images[1])
    for change, words in (
        ({}, "already exists"),
        ({"checkpoint_format": "ckpt", "custom_name": "zqx"}, "checkpoint_format"),
        ({"interp_method": "Add difference", "custom_name": "zqx"}, "tertiary"),
        ({"multiplier": 2, "custom_name": "zqx"}, "multiplier"),
        ({"secondary_model_name": "nosuch", "custom_name": "zqx"}, "nosuch"),
    ):
        refused = requests.post(f"{url}/merge/checkpoint", json={**body, **change}, timeout=60)
        assert refused.status_code in (400, 422) and words in refused.text, (change, refused.text)


def test_the_reader_refuses_a_damaged_file_before_reading_a_tensor(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3, dtype=torch.int64)}, str(good), {"k": "v"})
    data = good.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    cases = {
        "short": data[:5],
        "long header": struct.pack("<Q", 10**9) + data[8:],
        "not json": data[:8] + b"{" * length + data[8 + length :],
        "truncated": data[:-20],
        "wrong shape": _with_header(data, length, {**header, "a": {**header["a"], "shape": [5, 4]}}),
        "bad dtype": _with_header(data, length, {**header, "a": {**header["a"], "dtype": "F7"}}),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError):
            StreamedReader(path)
    assert StreamedReader(good).get("b").tolist() == [0, 0, 0]


def _with_header(data: bytes, length: int, header: dict) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]
