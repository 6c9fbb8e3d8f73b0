"""DANet's channel attention module against its official code written out."""

import pytest
import torch

import fgattn
from fgattn import ChannelAttentionModule


def danet_cam(x, gamma):
    """The official CAM_Module.forward, line for line (in float64)."""
    b, c, h, w = x.shape
    proj_query = x.view(b, c, -1)
    proj_key = x.view(b, c, -1).permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, x.view(b, c, -1)).view(b, c, h, w)
    return gamma * out + x


def test_matches_the_official_code_forward_and_backward():
    cam = ChannelAttentionModule().double()
    with torch.no_grad():
        cam.gamma.fill_(0.7)
    x = (torch.randn(2, 16, 5, 6, dtype=torch.float64) * 3).relu().requires_grad_()
    out = cam(x)
    g = torch.randn_like(out)
    dx, dgamma = torch.autograd.grad(out, (x, cam.gamma), g)
    x_ref = x.detach().clone().requires_grad_()
    gamma_ref = torch.full((1,), 0.7, dtype=torch.float64, requires_grad=True)
    ref = danet_cam(x_ref, gamma_ref)
    rdx, rdgamma = torch.autograd.grad(ref, (x_ref, gamma_ref), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dgamma, rdgamma)


def test_starts_as_the_identity_and_gamma_learns():
    cam = ChannelAttentionModule()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(cam(x), x)  # γ = 0
    cam(x).square().sum().backward()
    assert cam.gamma.grad is not None and cam.gamma.grad.abs().item() > 0


def test_state_dict_matches_danet_and_loads_its_gamma():
    cam = ChannelAttentionModule()
    assert list(cam.state_dict()) == ["gamma"] and cam.gamma.shape == (1,)
    cam.load_state_dict({"gamma": torch.tensor([0.25])})
    assert cam.gamma.item() == 0.25


def test_large_logits_in_bfloat16_stay_finite_and_keep_the_layout():
    cam = ChannelAttentionModule(gamma_init=1.0)
    x = (
        (torch.randn(2, 32, 7, 7) * 30)
        .relu()
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    out = cam(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = danet_cam(x.double(), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(out.double(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


def test_compiles_fullgraph():
    cam = ChannelAttentionModule(gamma_init=0.5)
    x = torch.randn(2, 8, 4, 4)
    compiled = torch.compile(cam, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), cam(x))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ChannelAttentionModule(scale=float("nan")), ValueError, "scale must be a finite"),
        (lambda: ChannelAttentionModule(gamma_init="0"), TypeError, "gamma_init must be a float"),
        (lambda: ChannelAttentionModule()(torch.randn(2, 8, 16)), ValueError, r"\(B, C, H, W\)"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_exported_at_top_level():
    assert fgattn.ChannelAttentionModule is ChannelAttentionModule
