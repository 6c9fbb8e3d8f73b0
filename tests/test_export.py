"""Deployment: the inference models export with torch.export and the exported program agrees with
eager (CPU; the dispatched attention is traced like any PyTorch code)."""

import pytest
import torch

import fgattn


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_torch_export_of_inference_models(arch):
    model = fgattn.create_model(arch, backbone="resnet10t", num_classes=5, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    other = torch.randn(2, 3, 64, 64)  # the program is not tied to the example's values
    torch.testing.assert_close(program.module()(other), model(other))


def test_torch_export_of_the_layers():
    x = torch.randn(2, 16, 7, 7).relu()
    for layer in (fgattn.SCI(16), fgattn.ChannelAttentionModule(gamma_init=0.5)):
        program = torch.export.export(layer.eval(), (x,))
        torch.testing.assert_close(program.module()(x), layer(x))
