"""The readers of files users drop in (embeddings, hypernetworks, LoRAs) fed valid files with random bytes flipped,
cut short or spliced in, and plain random bytes: they answer with their own format error (a sentence for the
skipped list) or a valid result, never another exception."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from app.embeddings.formats import EmbeddingFileError, read_embedding_file
from app.hypernetworks.files import read_hypernetwork_file, save_hypernetwork
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError
from app.lora.files import LoraFormatError, bundled_embeddings, read_lora_file, read_lora_header


def _pt(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    embedding = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(2, 32, generator=g)},
        "name": "x",
        "step": 3,
    }
    lora = {
        "lora_unet_a_b.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_a_b.lora_up.weight": torch.randn(32, 4, generator=g),
        "lora_unet_a_b.alpha": torch.tensor(2.0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        hn = Hypernetwork.create("h", [32], [1, 2, 1], "linear", "Normal", False, False, None)
        save_hypernetwork(hn, Path(tmp) / "h.pt")
        hn_bytes = (Path(tmp) / "h.pt").read_bytes()
        save_hypernetwork(hn, Path(tmp) / "h.safetensors")
        hn_st = (Path(tmp) / "h.safetensors").read_bytes()
    return {
        "embedding.pt": _pt(embedding),
        "embedding.safetensors": save({"emb_params": embedding["string_to_param"]["*"]}),
        "hypernetwork.pt": hn_bytes,
        "hypernetwork.safetensors": hn_st,
        "lora.safetensors": save(lora, metadata={"ss_output_name": "x"}),
        "lora-bundle.safetensors": save(
            {
                **lora,
                "bundle_emb.w.string_to_param.*": torch.randn(2, 32, generator=g),
                "bundle_emb.x.clip_l": torch.randn(1, 32, generator=g),
                "bundle_emb.x.clip_g": torch.randn(1, 64, generator=g),
            }
        ),
        "lora.pt": _pt(lora),
        # LyCORIS's other kinds, one layer each: (IA)³, OFT, GLoRA, full difference, norm
        "lora-lycoris.safetensors": save(
            {
                "lora_unet_a.weight": torch.randn(8, generator=g),
                "lora_unet_a.on_input": torch.tensor(0),
                "lora_unet_b.oft_blocks": torch.randn(2, 4, 4, generator=g),
                "lora_unet_b.alpha": torch.tensor(1e-3),
                "lora_unet_c.a1.weight": torch.randn(6, 2, generator=g),
                "lora_unet_c.a2.weight": torch.randn(2, 6, generator=g),
                "lora_unet_c.b1.weight": torch.randn(8, 2, generator=g),
                "lora_unet_c.b2.weight": torch.randn(2, 6, generator=g),
                "lora_unet_d.diff": torch.randn(8, 6, generator=g),
                "lora_unet_d.diff_b": torch.randn(8, generator=g),
                "lora_unet_e.w_norm": torch.randn(8, generator=g),
                "lora_unet_e.b_norm": torch.randn(8, generator=g),
            }
        ),
    }


SEEDS = _seeds()
READERS = {
    "embedding": (read_embedding_file, EmbeddingFileError),
    "hypernetwork": (read_hypernetwork_file, HypernetworkFormatError),
    "lora": (read_lora_file, LoraFormatError),
}


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "zero-run"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + draw(st.integers(1, 64))] = bytes(draw(st.integers(1, 64)))
    return name, bytes(data)


def _check(name: str, data: bytes) -> None:
    reader, error = READERS[name.split(".")[0].split("-")[0]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        readers = [reader, read_lora_header] if name.startswith("lora") else [reader]  # listing reads headers
        for read in readers:
            try:
                got = read(path)
            except error as e:
                assert str(e).strip(), "the reason must be a sentence"
            else:
                if read is read_lora_file:  # each bundled embedding: usable, or a sentence saying why not
                    for found in bundled_embeddings(got).values():
                        assert not isinstance(found, str) or found.strip()
                    for layer in got.layers.values():  # and each layer computes its update for a weight it fits
                        shape = tuple(2 if d is None else d for d in layer.update_shape)
                        delta = layer.delta(torch.device("cpu"), torch.ones(shape))
                        assert delta.shape[0] == shape[0]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_get_a_reason_or_load(case):
    _check(*case)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(SEEDS)), st.binary(max_size=256))
def test_random_bytes_get_a_reason(name, data):
    _check(name, data)


BUNDLE_PARTS = ["string_to_param.*", "string_to_param.<tok>", "clip_l", "clip_g", "emb_params", "other", "", "a.b.c"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
            st.sampled_from(BUNDLE_PARTS),
            st.lists(st.integers(0, 3), min_size=0, max_size=3),
            st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
        ),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
def test_any_bundled_embedding_keys_get_a_reason_or_load(bundles, with_layer):
    """Whatever a file puts under `bundle_emb.`: names with dots or odd characters, any part, shape and dtype, with
    or without LoRA layers beside it: the file reads or says why, and each bundle is an embedding or a reason."""
    tensors = {}
    if with_layer:
        tensors["lora_unet_a_b.lora_down.weight"] = torch.ones(4, 32)
        tensors["lora_unet_a_b.lora_up.weight"] = torch.ones(32, 4)
    for name, part, shape, dtype in bundles:
        tensors[f"bundle_emb.{name}.{part}" if part else f"bundle_emb.{name}"] = torch.zeros(shape, dtype=dtype)
    try:
        data = save(tensors)
    except Exception:  # safetensors itself refuses the key; nothing of ours to test
        return
    _check("lora.safetensors", data)
