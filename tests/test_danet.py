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


# ----------------------------------------------------------------------------------------------
# mmsegmentation's DAHead checkpoints


def mmseg_dahead_state_dict(c, k, channels, pam_channels):
    """An mmseg segmentor's state dict with a DAHead, written out by hand in mmseg's names and
    shapes (ConvModule = conv without bias + bn; PAM = SelfAttentionBlock's 1×1 projections;
    gamma = Scale, a 0-d tensor), random values, plus backbone and auxiliary-head keys."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sd = {"backbone.conv1.weight": rand(8, 3, 3, 3), "auxiliary_head.conv_seg.weight": rand(k, 8)}
    for branch in ("pam", "cam"):
        for conv, cin in (("in_conv", c), ("out_conv", channels)):
            name = f"decode_head.{branch}_{conv}"
            sd[f"{name}.conv.weight"] = rand(channels, cin, 3, 3) * 0.1
            sd[f"{name}.bn.weight"] = rand(channels).abs() + 0.5
            sd[f"{name}.bn.bias"] = rand(channels)
            sd[f"{name}.bn.running_mean"] = rand(channels)
            sd[f"{name}.bn.running_var"] = rand(channels).abs() + 0.5
            sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(7)
        sd[f"decode_head.{branch}_conv_seg.weight"] = rand(k, channels, 1, 1)
        sd[f"decode_head.{branch}_conv_seg.bias"] = rand(k)
        sd[f"decode_head.{branch}.gamma.scale"] = torch.tensor(0.6 if branch == "pam" else 0.4)
    for proj, out in (("query", pam_channels), ("key", pam_channels), ("value", channels)):
        sd[f"decode_head.pam.{proj}_project.weight"] = rand(out, channels, 1, 1) * 0.3
        sd[f"decode_head.pam.{proj}_project.bias"] = rand(out)
    sd["decode_head.conv_seg.weight"] = rand(k, channels, 1, 1)
    sd["decode_head.conv_seg.bias"] = rand(k)
    return sd


def mmseg_dahead_forward(sd, x):
    """mmseg's DAHead.forward in eval mode, line for line, from its state dict (float64)."""
    p = {k[len("decode_head.") :]: v for k, v in sd.items() if k.startswith("decode_head.")}

    def conv_module(name, t):
        t = F.conv2d(t, p[f"{name}.conv.weight"], padding=1)
        t = F.batch_norm(
            t, p[f"{name}.bn.running_mean"], p[f"{name}.bn.running_var"],
            p[f"{name}.bn.weight"], p[f"{name}.bn.bias"], training=False,
        )  # fmt: skip
        return F.relu(t)

    def project(name, t):
        return F.conv2d(t, p[f"pam.{name}_project.weight"], p[f"pam.{name}_project.bias"])

    def pam(t):  # SelfAttentionBlock.forward(t, t), then gamma(out) + t
        b = t.size(0)
        query = project("query", t)
        query = query.reshape(*query.shape[:2], -1).permute(0, 2, 1).contiguous()
        key = project("key", t)
        value = project("value", t)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1).permute(0, 2, 1).contiguous()
        sim_map = F.softmax(torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        context = context.reshape(b, -1, *t.shape[2:])
        return p["pam.gamma.scale"] * context + t

    def cam(t):
        return danet_cam(t, p["cam.gamma.scale"])

    def cls(name, t):
        return F.conv2d(t, p[f"{name}.weight"], p[f"{name}.bias"])

    pam_feat = conv_module("pam_out_conv", pam(conv_module("pam_in_conv", x)))
    cam_feat = conv_module("cam_out_conv", cam(conv_module("cam_in_conv", x)))
    return (
        cls("conv_seg", pam_feat + cam_feat),
        cls("pam_conv_seg", pam_feat),
        cls("cam_conv_seg", cam_feat),
    )


def test_head_loads_an_mmseg_dahead_checkpoint_and_matches_its_outputs():
    c, k = 64, 3
    sd = mmseg_dahead_state_dict(c, k, channels=c // 4, pam_channels=c // 32)
    x = torch.randn(2, c, 5, 6, dtype=torch.float64).relu()
    want = mmseg_dahead_forward(sd, x)
    converted = fgattn.layers.convert_mmseg_dahead({"state_dict": sd, "meta": {}})
    head = DualAttentionHead(c, k).double().eval()
    assert sorted(converted) == sorted(head.state_dict())
    head.load_state_dict(converted)
    assert head.sa.gamma.shape == (1,) and head.sa.gamma.item() == pytest.approx(0.6)
    for got, ref in zip(head(x, return_branches=True), want, strict=True):
        torch.testing.assert_close(got, ref)
    # load_state_dict takes mmseg's names directly (the head's keys without "decode_head.").
    direct = DualAttentionHead(c, k).double().eval()
    direct.load_state_dict({n[12:]: v for n, v in sd.items() if n.startswith("decode_head.")})
    torch.testing.assert_close(direct(x), want[0])
    # So do the attention modules on their own.
    pam = PositionAttentionModule(c // 4).double()
    pam.load_state_dict({n[16:]: v for n, v in sd.items() if n.startswith("decode_head.pam.")})
    torch.testing.assert_close(pam.gamma, torch.tensor([0.6], dtype=torch.float64))
    cam = ChannelAttentionModule()
    cam.load_state_dict({"gamma.scale": torch.tensor(0.4)})
    assert cam.gamma.shape == (1,) and cam.gamma.item() == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"no key under prefix 'decode_head\.'"):
        fgattn.layers.convert_mmseg_dahead({"backbone.conv1.weight": torch.zeros(1)})
