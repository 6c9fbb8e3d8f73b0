"""DANet's channel attention module, position attention module and dual attention head against
the official code written out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgattn
from fgattn import ChannelAttentionModule, DualAttentionHead, PositionAttentionModule


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
    assert fgattn.PositionAttentionModule is PositionAttentionModule
    assert fgattn.DualAttentionHead is DualAttentionHead


# ----------------------------------------------------------------------------------------------
# Position attention and the dual attention head


def danet_pam(x, query, key, value, gamma):
    """The official PAM_Module.forward, line for line: energy = Qᵀ K over positions, softmax over
    the keys, out = V Aᵀ (DANet eq. 1–2)."""
    b, c, h, w = x.shape
    proj_query = query(x).view(b, -1, w * h).permute(0, 2, 1)
    proj_key = key(x).view(b, -1, w * h)
    energy = torch.bmm(proj_query, proj_key)
    attention = torch.softmax(energy, dim=-1)
    proj_value = value(x).view(b, -1, w * h)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, h, w)
    return gamma * out + x


class OfficialPAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.query_conv = nn.Conv2d(c, c // 8, 1)
        self.key_conv = nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return danet_pam(x, self.query_conv, self.key_conv, self.value_conv, self.gamma)


class OfficialCAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return danet_cam(x, self.gamma)


class OfficialDANetHead(nn.Module):
    """DANetHead's structure and forward as in the official code."""

    def __init__(self, c, k):
        super().__init__()
        inter = c // 4

        def cbr(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()
            )

        self.conv5a, self.conv5c = cbr(c, inter), cbr(c, inter)
        self.sa, self.sc = OfficialPAM(inter), OfficialCAM()
        self.conv51, self.conv52 = cbr(inter, inter), cbr(inter, inter)
        for name in ("conv6", "conv7", "conv8"):
            setattr(self, name, nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter, k, 1)))

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)


def randomize(module):
    """Non-zero γ and BN statistics, so that every term of the equations shows."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("gamma"):
                tensor.fill_(0.6)
            elif name.endswith("running_mean"):
                tensor.normal_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    return module


def test_position_attention_matches_the_official_code_forward_and_backward():
    pam = randomize(PositionAttentionModule(16)).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64).requires_grad_()
    out = pam(x)
    ref = danet_pam(x, pam.query_conv, pam.key_conv, pam.value_conv, pam.gamma)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x, *pam.parameters()]
    for got, want in zip(
        torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_position_attention_starts_as_the_identity():
    pam = PositionAttentionModule(16)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(pam(x), x)


def test_head_loads_the_official_state_dict_and_matches_its_outputs():
    official = randomize(OfficialDANetHead(64, 5)).double().eval()
    head = DualAttentionHead(64, 5).double().eval()
    assert list(head.state_dict()) == list(official.state_dict())  # same names, same order
    head.load_state_dict(official.state_dict())
    x = torch.randn(2, 64, 6, 7, dtype=torch.float64).relu()
    fused, position, channel = head(x, return_branches=True)
    want = official(x)
    for got, ref in zip((fused, position, channel), want, strict=True):
        assert got.shape == (2, 5, 6, 7)
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(head(x), want[0])


def test_head_trains_every_part():
    head = randomize(DualAttentionHead(32, 3)).train()
    x = torch.randn(2, 32, 5, 5).relu()
    target = torch.randint(0, 3, (2, 5, 5))
    loss = sum(F.cross_entropy(out, target) for out in head(x, return_branches=True))
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_input_gives_the_same_numbers():
    x = torch.randn(2, 32, 5, 6).relu()
    cl = x.contiguous(memory_format=torch.channels_last)
    for layer in (PositionAttentionModule(32, gamma_init=0.5), randomize(DualAttentionHead(32, 3))):
        layer.eval()
        torch.testing.assert_close(layer(cl), layer(x), atol=1e-5, rtol=1e-5)


def test_head_compiles_fullgraph():
    head = randomize(DualAttentionHead(32, 3)).eval()
    x = torch.randn(2, 32, 5, 5).relu()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), head(x))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: DualAttentionHead(16, 3),
            ValueError,
            r"in_channels // reduction must be at least 8",
        ),
        (lambda: DualAttentionHead(64, 0), ValueError, "num_classes must be an int >= 1"),
        (lambda: DualAttentionHead(64.0, 3), TypeError, "in_channels must be an int"),
        (lambda: DualAttentionHead(64, 3, dropout=1.5), ValueError, "dropout must be a finite"),
        (lambda: DualAttentionHead(64, 3)(torch.randn(2, 32, 4, 4)), ValueError, "64 channels"),
        (lambda: PositionAttentionModule(4), ValueError, "channels must be at least reduction"),
        (lambda: PositionAttentionModule(16)(torch.randn(2, 16, 4)), ValueError, r"\(B, C, H, W\)"),
    ],
)
def test_head_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
