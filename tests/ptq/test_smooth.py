"""SmoothQuant's migration (ptq/smooth.py): on inputs with outlier channels it raises the SQNR of a W8A8 layer,
the exported integer layer (int8 kernel) computes its fake-quantized output, and the saved spec rebuilds it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.ptq.config import PTQConfig
from quantune.ptq.smooth import smoothing_factors
from quantune.ptq.wrap import PTQLayer
from quantune.quant.kernels import prepare_int_kernels
from quantune.quant.layers import layer_from_spec
from quantune.quant.primitives import sqnr_db


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc = layer

    def forward(self, x):
        return self.fc(x)


def _outlier_inputs(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        x = torch.randn(8, 16, 64, generator=g)  # [B, tokens, C], as a DiT's Linear sees them
        x[..., :4] *= 60.0  # four outlier channels (adaLN-modulated activations have such)
        batches.append({"x": x})
    return batches


def _quantized(model: _One, cfg: PTQConfig, smooth: torch.Tensor | None, batches) -> PTQLayer:
    layer = PTQLayer(model.fc, cfg.weight, cfg.act, smooth=smooth)
    layer.aq.begin_observing()
    for b in batches:
        layer(b["x"])
    layer.aq.finish_observing()
    layer.quant, layer.wq.hard = True, True  # minmax: round to nearest
    return layer


def test_migration_helps_inputs_with_outlier_channels():
    torch.manual_seed(0)
    model, batches = _One(nn.Linear(64, 32)), _outlier_inputs()
    cfg = PTQConfig(method="minmax", smooth=0.5)
    x = batches[0]["x"]
    with torch.no_grad():
        ref = model(x)
        s = smoothing_factors(model, ["fc"], batches, 0.5)["fc"]
        plain = sqnr_db(ref, _quantized(model, cfg, None, batches)(x))
        smoothed = sqnr_db(ref, _quantized(model, cfg, s, batches)(x))
    assert s[:4].min() > 4 * s[4:].max()  # the outlier channels are divided the most
    assert smoothed > plain + 6  # measured: 30.0 -> 38.8 dB


def test_smoothed_integer_layer_runs_the_kernel_and_reloads():
    torch.manual_seed(0)
    model, batches = _One(nn.Linear(64, 32)), _outlier_inputs()
    cfg = PTQConfig(method="minmax", smooth=0.5)
    s = smoothing_factors(model, ["fc"], batches, 0.5)["fc"]
    x = batches[1]["x"]
    with torch.no_grad():
        layer = _quantized(model, cfg, s, batches)
        fake = layer(x)
        integer = layer.export()
        assert torch.equal(integer.act_quant.smooth, s)
        torch.testing.assert_close(integer(x), fake, rtol=0, atol=1e-4)  # the fake path: same grid, same weight
        rebuilt = layer_from_spec(integer.spec())
        rebuilt.load_state_dict(integer.state_dict())
        assert torch.equal(rebuilt(x), integer(x))
        torch.testing.assert_close(rebuilt.dequantize(), model.fc.weight, rtol=0, atol=0.05)  # W, s divided out
        way = prepare_int_kernels(integer)
        assert "int8 (onednn)" in way or "int8 (int_mm)" in way, way
        assert sqnr_db(fake, integer(x)) > 40  # int8 product vs its fake-quantized twin; measured 134 dB


@pytest.mark.parametrize("bad", [dict(smooth=1.5), dict(smooth=-0.1), dict(smooth=0.5, abits=None)])
def test_bad_smoothing_settings_are_refused(bad):
    with pytest.raises(QuantuneError, match="smooth"):
        PTQConfig(method="minmax", **bad)
