"""Affine hypernetworks folded into the attention projections: the same numbers as running their MLPs, in
generation and in training, and the MLP path wherever folding does not apply."""

from __future__ import annotations

import pytest
import torch

from app.hypernetworks.attention import HypernetworkStack, attention_widths, install
from app.hypernetworks.hypernetwork import Hypernetwork
from app.hypernetworks.module import HypernetworkModule


def network(name, widths, structure=(1, 2, 1), activation="linear", layer_norm=False, dropout=False, seed=0):
    # XavierNormal: weights of a trained network's size, so that a wrong fold shows (A1111's "Normal" is 0.01).
    return Hypernetwork.create(
        name, widths, list(structure), activation, "XavierNormal", layer_norm, dropout, None, seed=seed
    )


@pytest.mark.parametrize("structure", [(1, 2, 1), (1, 1.5, 2, 1), (1, 1)])
def test_a_linear_module_is_the_affine_map_it_reports(structure):
    torch.manual_seed(0)
    module = HypernetworkModule(40, list(structure))
    module.initialize("XavierNormal", "linear")
    x = torch.randn(2, 100, 40)
    for training, multiplier in ((False, 1.0), (False, 0.6), (True, 0.6)):
        module.train(training)
        a, c = module.affine(multiplier)
        assert a.shape == (40, 40) and c.shape == (40,)
        torch.testing.assert_close(x @ a.T + c, module(x, multiplier), atol=1e-5, rtol=1e-5)


def test_modules_with_an_activation_a_layer_norm_or_live_dropout_are_not_affine():
    assert HypernetworkModule(40, [1, 2, 1], "relu").affine() is None
    assert HypernetworkModule(40, [1, 2, 1], layer_norm=True).affine() is None
    dropout = HypernetworkModule(40, [1, 2, 2, 1], dropout_structure=[0, 0.3, 0.3, 0])
    assert dropout.train(True).affine() is None
    assert dropout.train(False).affine() is not None  # dropout does nothing outside training


@pytest.fixture(scope="module")
def unet(services):
    unet = services.models.get().pipe.unet
    yield unet
    install(unet, services.training.stack)  # as the services installed it


def run(unet, stack, networks, fold, latent=8, grad=False):
    """The UNet's output (and the networks' gradients) with `networks` active, folded or as MLPs."""
    install(unet, stack, fold=fold)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    for hn, _ in networks:
        hn.train(grad)
        for p in hn.parameters_for(set(hn.widths)):
            p.grad = None
            p.requires_grad_(grad)
    with stack.using(networks), torch.set_grad_enabled(grad):
        out = unet(x, torch.tensor([500]), context).sample
        folds = len(stack._folds)
        if grad:
            out.square().mean().backward()
    grads = [p.grad.clone() for hn, _ in networks for p in hn.parameters_for(set(hn.widths))] if grad else []
    return out.detach(), grads, folds


def test_folded_generation_equals_the_mlps_and_caches_one_fold_per_layer(unet):
    stack = HypernetworkStack()
    widths = sorted(attention_widths(unet))
    networks = [(network("a", widths), 0.8), (network("b", widths, (1, 1.5, 1), seed=1), 0.5)]  # chained, as A1111
    # 128 px: every self-attention layer has at least as many positions as its width, so every one folds.
    folded, _, folds = run(unet, stack, networks, fold=True, latent=16)
    plain, _, none = run(unet, stack, networks, fold=False, latent=16)
    without, _, _ = run(unet, stack, [], fold=True, latent=16)
    assert none == 0 and folds == sum(1 for m in unet.modules() if getattr(m, "is_cross_attention", None) is False)
    torch.testing.assert_close(folded, plain, atol=1e-4, rtol=1e-4)
    assert (plain - without).abs().max() > 100 * (folded - plain).abs().max()  # the networks do change it


def test_folded_training_gives_the_mlps_gradients(unet):
    stack = HypernetworkStack()
    hn = network("t", sorted(attention_widths(unet)))
    folded, folded_grads, folds = run(unet, stack, [(hn, 1.0)], fold=True, grad=True)
    plain, plain_grads, _ = run(unet, stack, [(hn, 1.0)], fold=False, grad=True)
    assert folds == 0  # with autograd the fold is recomputed each call, never cached
    torch.testing.assert_close(folded, plain, atol=1e-4, rtol=1e-4)
    assert len(folded_grads) == len(plain_grads) > 0 and any(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(folded_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_a_relu_network_runs_as_its_mlp(unet):
    stack = HypernetworkStack()
    widths = sorted(attention_widths(unet))
    relu = [(network("r", widths, activation="relu"), 1.0)]
    folded, _, folds = run(unet, stack, relu, fold=True)
    plain, _, _ = run(unet, stack, relu, fold=False)
    assert folds == 0
    assert torch.equal(folded, plain)


def test_projections_that_are_not_plain_or_not_here_take_the_mlp_path():
    stack = HypernetworkStack()
    with stack.using([(network("p", [16]), 1.0)]), torch.no_grad():
        x = torch.randn(1, 32, 16)
        plain = torch.nn.Linear(16, 16, bias=False)
        assert stack.folded(plain, plain, x) is not None

        class Wrapped(torch.nn.Linear):  # e.g. PEFT's LoRA layer while a LoRA trains: its forward adds to the weight
            pass

        assert stack.folded(Wrapped(16, 16), plain, x) is None
        meta = torch.nn.Linear(16, 16, bias=False, device="meta")  # --lowvram: weights arrive only inside the call
        assert stack.folded(meta, plain, x) is None
        assert stack.folded(plain, plain, torch.randn(1, 32, 24)) is None  # no module for this width
