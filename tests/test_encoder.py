"""The conditioning encoder against hand-built references on the real tiny text encoder."""

import pytest
import torch

from app.prompts.encoder import PromptEncoder, final_layer_norm


@pytest.fixture(scope="module")
def encoder(services):
    model = services.models.get()
    return PromptEncoder(model.pipe.tokenizer, model.pipe.text_encoder)


def reference_hidden(encoder, text, clip_skip=1):
    tokens = encoder.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder.text_encoder(input_ids=tokens, output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state
        return final_layer_norm(encoder.text_encoder)(out.hidden_states[-clip_skip])


def test_plain_prompt_equals_text_encoder_output(encoder):
    with torch.no_grad():
        ours = encoder.encode(["a photo of a cat"])
    assert ours.shape == (1, 77, encoder.text_encoder.config.hidden_size)
    torch.testing.assert_close(ours, reference_hidden(encoder, "a photo of a cat"))


def test_clip_skip_takes_earlier_layer_then_final_norm(encoder):
    with torch.no_grad():
        skip2 = encoder.encode(["a photo of a cat"], clip_skip=2)
    torch.testing.assert_close(skip2, reference_hidden(encoder, "a photo of a cat", clip_skip=2))
    assert not torch.allclose(skip2, reference_hidden(encoder, "a photo of a cat"))


def test_emphasis_scales_tokens_and_restores_mean(encoder):
    with torch.no_grad():
        weighted = encoder.encode(["a (photo:1.5) of a cat"])
    base = reference_hidden(encoder, "a photo of a cat")
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = 1.5
    expected = base * weights
    expected = expected * (base.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)


def test_long_prompt_concatenates_chunks(encoder):
    with torch.no_grad():
        out = encoder.encode([" ".join(["cat"] * 100)])
    assert out.shape[1] == 154


def test_batch_with_different_lengths_pads_with_empty_chunks(encoder):
    with torch.no_grad():
        out = encoder.encode(["cat", " ".join(["dog"] * 80)])
        empty = encoder.encode([""])
    assert out.shape[:2] == (2, 154)
    torch.testing.assert_close(out[0, 77:], empty[0])
