"""Deployment: the inference models and layers export with torch.export and to ONNX (the dynamo
exporter, run in onnxruntime on CPU), and the exported programs agree with eager. While an exporter
traces, an implementation it cannot translate (fgattn's Triton custom ops) gives way to the
plain-PyTorch reference, with one warning.

The ONNX tests need the `test` extra (onnx, onnxscript, onnxruntime); without it they fail."""

import warnings

import pytest
import torch

import fgattn
from fgattn.ops import dispatch, sdpa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(arch):
    model = fgattn.create_model(arch, backbone="resnet10t", num_classes=5, pretrained=False)
    return model.eval()


def layers():
    torch.manual_seed(0)
    head = fgattn.DualAttentionHead(32, 3).eval()
    with torch.no_grad():  # γ = 0 would hide both attention modules
        head.sa.gamma.fill_(0.5)
        head.sc.gamma.fill_(0.5)
    return {
        "sci": fgattn.SCI(32).eval(),
        "cam": fgattn.ChannelAttentionModule(gamma_init=0.5).eval(),
        "pam": fgattn.PositionAttentionModule(32, gamma_init=0.5).eval(),
        "dual_attention_head": head,
    }


def export_onnx(model, x, path, **kwargs):
    """The README's commands: the dynamo exporter, saved, then an onnxruntime CPU session."""
    import onnxruntime  # the test extra installs it; missing, the test fails

    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(inp):
        (out,) = session.run(None, {session.get_inputs()[0].name: inp.cpu().numpy()})
        return torch.from_numpy(out)

    return program, run


# onnxruntime against eager in fp32: the same operations with other kernels (convolution
# algorithms, summation order), so the outputs differ by rounding: measured at most 1e-6 absolute
# on outputs up to 12 (SCI, CAM, PAM), 7e-8 on CIN's logits (up to 0.18), 6e-9 on PCA-Net's (up to
# 0.007). PCA-Net's signed square root amplifies an error δ near 0 to about δ / (2 sqrt|x|), hence
# the relative tolerance; atol stays below PCA-Net's logits.
ONNX_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_torch_export_of_inference_models(arch):
    model = tiny_model(arch)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    other = torch.randn(2, 3, 64, 64)  # the program is not tied to the example's values
    torch.testing.assert_close(program.module()(other), model(other))


@pytest.mark.parametrize("name", ["sci", "cam", "pam", "dual_attention_head"])
def test_torch_export_of_the_layers(name):
    layer = layers()[name]
    x = torch.randn(2, 32, 7, 7).relu()
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_onnx_export_of_inference_models_runs_in_onnxruntime(arch, tmp_path):
    model = tiny_model(arch)
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    _, run = export_onnx(model, x, tmp_path / f"{arch}.onnx", dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), **ONNX_TOLERANCE)
        other = torch.randn(3, 3, 64, 64)  # another batch size, other values
        torch.testing.assert_close(run(other), model(other), **ONNX_TOLERANCE)


@pytest.mark.parametrize("name", ["sci", "cam", "pam", "dual_attention_head"])
def test_onnx_export_of_the_layers_runs_in_onnxruntime(name, tmp_path):
    layer = layers()[name]
    x = (torch.randn(2, 32, 7, 7) * 3).relu()  # post-ReLU, logits of a few hundred
    _, run = export_onnx(layer, x, tmp_path / f"{name}.onnx")
    with torch.no_grad():
        torch.testing.assert_close(run(x), layer(x), **ONNX_TOLERANCE)


def fgattn_ops(graph_module):
    return [n for n in graph_module.graph.nodes if str(n.target).startswith("fgattn.")]


@pytest.mark.parametrize("backend", ["triton_tiled", "triton_flash"])
def test_export_replaces_fused_custom_ops_with_the_reference_and_says_so(
    backend, monkeypatch, tmp_path
):
    model = tiny_model("cin").to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    monkeypatch.setattr(dispatch, "_export_warned", set())
    with fgattn.backends.use_backend(backend):
        # Eager runs the fused custom op (on CPU through Triton's interpreter, see conftest), and
        # without the fallback so would the exported program ...
        assert fgattn.backends.resolve("self", model.forward_features(x).flatten(2)) == backend
        with monkeypatch.context() as without_fallback:
            without_fallback.setattr(dispatch, "exporting", lambda: False)
            assert fgattn_ops(torch.export.export(model, (x,)).graph_module)
        # ... with it, it does not, and the warning points at the line that exported.
        with pytest.warns(UserWarning, match=rf"'{backend}' implementation.*'reference'") as record:
            program = torch.export.export(model, (x,))
        assert fgattn_ops(program.graph_module) == []
        assert any(w.filename == __file__ for w in record)
        with warnings.catch_warnings(record=True) as again:  # said once: a second export is silent
            warnings.simplefilter("always")
            torch.export.export(model, (x,))
        assert not [w for w in again if "fgattn" in str(w.message)]
        monkeypatch.setattr(dispatch, "_export_warned", set())
        with pytest.warns(UserWarning, match=rf"'{backend}' implementation.*'reference'"):
            onnx_program, run = export_onnx(model, x, tmp_path / "cin.onnx")
        with torch.no_grad():
            eager = model(x)
    assert {node.domain for node in onnx_program.model_proto.graph.node} <= {""}  # plain ONNX
    torch.testing.assert_close(program.module()(x), eager)
    torch.testing.assert_close(run(x), eager.cpu(), **ONNX_TOLERANCE)


def test_strict_export_falls_back_too(monkeypatch):
    # torch.export(strict=True) traces with dynamo, which runs the warning eagerly.
    sci = layers()["sci"].to(DEVICE)
    x = torch.randn(2, 32, 7, 7, device=DEVICE).relu()
    monkeypatch.setattr(dispatch, "_export_warned", set())
    with fgattn.backends.use_backend("triton_tiled"):
        assert fgattn.backends.resolve("self", x.flatten(2)) == "triton_tiled"
        with pytest.warns(
            UserWarning, match=r"'triton_tiled' implementation.*'reference'"
        ) as record:
            program = torch.export.export(sci, (x,), strict=True)
    assert fgattn_ops(program.graph_module) == []
    assert any(w.filename == __file__ for w in record)
    torch.testing.assert_close(program.module()(x), sci(x))


# ---------------------------------------------------------------------------------------------
# A dynamic batch, and the TorchScript exporter (dynamo=False)

BATCH = torch.export.Dim("batch", min=1, max=64)


def _dynamic_cases():
    """(name, model, example input): the models, and the layers at C = 512, where eager `auto`
    runs SDPA's CPU kernel (below, the reference)."""
    torch.manual_seed(0)
    yield "cin", tiny_model("cin"), torch.randn(2, 3, 64, 64)
    yield "pcanet", tiny_model("pcanet"), torch.randn(2, 3, 64, 64)
    yield "sci", fgattn.SCI(512).eval(), torch.randn(2, 512, 7, 7).relu()
    yield "cam", fgattn.ChannelAttentionModule(gamma_init=0.5).eval(), torch.randn(2, 512, 7, 7)
    yield "dual_attention_head", layers()["dual_attention_head"], torch.randn(2, 32, 7, 7)


@pytest.mark.parametrize("case", list(_dynamic_cases()), ids=lambda c: c[0])
def test_torch_export_with_a_dynamic_batch(case):
    # one program for every batch size: before, dispatch's min(B, C, L) == 0 guarded 2 <= B <= L
    _, model, x = case
    program = torch.export.export(model, (x,), dynamic_shapes=({0: BATCH},))
    for batch in (1, 2, 5):
        other = torch.randn(batch, *x.shape[1:])
        torch.testing.assert_close(program.module()(other), model(other), rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["unpadded", "padded"])
def sdpa_width(request, monkeypatch):
    """SDPA's head dim as the CPU gets it (L) or as CUDA does (padded to 8), so that the CUDA
    path's export is checked on CPU too."""
    if request.param == "padded":
        monkeypatch.setattr(sdpa, "_width", lambda length, device: -(-length // 8) * 8)
    return request.param


@pytest.mark.parametrize("case", list(_dynamic_cases())[:3], ids=lambda c: c[0])
def test_torchscript_onnx_export_runs_in_onnxruntime(case, sdpa_width, tmp_path):
    # The deprecated exporter (torch.jit tracing) wrote a CIN file onnxruntime could not run
    # (/sci/Reshape: SDPA's padded head dim); SDPA now gives way to the reference while it traces.
    import onnxruntime

    name, model, x = case
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        other = torch.randn(batch, *x.shape[1:]).relu()
        (got,) = session.run(None, {"x": other.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(other), **ONNX_TOLERANCE)
