"""The PTQ-method seam: the registry (ptq/methods/), PTQConfig's conversion to the shared quantization vocabulary
and the methods' options, a new method as one registered class run by the generic driver, and the public
`quantize_model` entry point that `quantize_pipeline` goes through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import quantune.ptq
from quantune.errors import QuantuneError
from quantune.ptq import METHODS, PTQConfig, quantize_model, quantize_pipeline
from quantune.ptq.methods import PTQMethod, Reconstructing, method_for, register_method
from quantune.ptq.reconstruct import ReconRecipe
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.quantize import quant_layers

SMALL = dict(calib_samples=8, steps=4, iters=20, batch_size=8, resolution=16)


def test_registry_and_the_configs_vocabulary():
    assert list(METHODS) == ["minmax", "qdiffusion", "eda-dm", "eda-dm-reference"] and quantune.ptq.METHODS is METHODS
    from quantune.families.sd import StableDiffusion

    cfg = PTQConfig(method="qdiffusion", wbits=4, abits=8, attn_bits=6).for_family(StableDiffusion())
    assert PTQConfig().keep_8bit is None  # unset: the model family's, resolved by quantize_pipeline / quantize_model
    assert cfg.weight == WeightQuant(4, per_channel=True, symmetric=False, search="l2.4")
    assert cfg.act == ActQuant(8) and cfg.attn == ActQuant(6)
    assert cfg.weight_for("time_embedding.linear_1") == WeightQuant(8, symmetric=True)  # keep_8bit
    assert cfg.act_for("conv_out") is None and cfg.act_for("conv_in") == ActQuant(8)  # act_fp
    minmax = PTQConfig(method="minmax", abits=None)  # weight-only: no activation (nor attention) quantized
    assert minmax.act is None and minmax.attn is None and minmax.weight == WeightQuant(8, True, True, "minmax")
    assert not minmax.learns and cfg.learns and not PTQConfig(method="eda-dm", iters=0).learns
    assert "weight" not in cfg.to_dict() and cfg.to_dict()["wbits"] == 4  # the report keeps the settings only


def test_method_options():
    assert method_for(PTQConfig()).options.qdrop == 0.5
    assert PTQConfig(extra_options={"qdrop": 0.25}).options.qdrop == 0.25
    with pytest.raises(QuantuneError, match="'eda-dm' has no option 'damp'"):
        PTQConfig(extra_options={"damp": 0.1})
    with pytest.raises(QuantuneError, match="tdac_r"):
        PTQConfig(tdac_r=0.0)
    assert PTQConfig(method="minmax", qdrop=0.0).options is not None  # eda-dm's options do not bind minmax


@pytest.mark.parametrize("wbits, lr_w", [(8, 5e-4), (4, 3e-2)])
def test_eda_dm_reference_preset(wbits, lr_w):
    cfg = PTQConfig(method="eda-dm-reference", wbits=wbits, lr_w=0.5, round_reg=0.01)
    method = method_for(cfg)
    assert cfg.weight.search == "l2.4-full" and cfg.act.search == "l2.4-full"  # candidates down to 1 % of the range
    assert (method.cfg.round_reg, method.cfg.lr_w) == (0.0, lr_w)  # the reference's, not the flags'
    assert method.recipe() == method_for(PTQConfig(method="eda-dm")).recipe()  # TDAC + FBR + QDrop as eda-dm


def test_the_full_search_reaches_ranges_below_a_fifth_of_the_max():
    from quantune.quant.primitives import search_qparams

    x = torch.cat([torch.linspace(-1, 1, 100001), torch.tensor([20.0])])  # one outlier 20x the bulk
    short = search_qparams(x, 4, per_channel=False, symmetric=True)
    full = search_qparams(x, 4, per_channel=False, symmetric=True, search="l2.4-full")
    assert float(short.scale) * 7 / 20 == pytest.approx(0.21, rel=1e-5)  # the 80-candidate search stops at 21 %
    assert float(full.scale) * 7 / 20 == pytest.approx(0.05, rel=1e-5)  # the full one clips the outlier, fits the bulk


def test_no_method_name_checks_outside_the_methods_files():
    ptq = Path(quantune.ptq.__file__).parent
    checks = re.compile(r"""method\s*(==|!=|in)\s*[("']""")
    for path in ptq.glob("*.py"):
        assert not checks.search(path.read_text()), path.name


def _unet_batches(unet, n: int = 2, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    return [{"sample": torch.randn(batch, 4, 8, 8, generator=g),
             "timestep": torch.randint(0, 1000, (batch,), generator=g),
             "encoder_hidden_states": torch.randn(batch, 77, dim, generator=g)} for _ in range(n)]  # fmt: skip


def test_a_new_method_is_one_registered_class(tiny):
    calls = []

    @register_method
    class OneStage(Reconstructing):
        """BRECQ-like: AdaRound on the block output only, activation ranges left as observed."""

        name = "one-stage"

        def wrap(self, model, splits, smooth=None):
            calls.append("wrap")
            return super().wrap(model, splits, smooth)

        def recipe(self) -> ReconRecipe:
            return ReconRecipe(stages=((True, False),))

        def export(self, model):
            calls.append("export")
            return super().export(model)

    try:
        report = quantize_model(tiny.unet, _unet_batches(tiny.unet), PTQConfig(method="one-stage", iters=2))
        assert calls == ["wrap", "export"] and report["method"] == "one-stage"
        assert report["layers"] == len(quant_layers(tiny.unet)) == 83 and len(report["losses"]) == report["units"]
    finally:
        METHODS.pop("one-stage")
    assert isinstance(method_for(PTQConfig()), PTQMethod)


def test_quantize_pipeline_is_calibration_then_quantize_model(tiny):
    from quantune.data.prompts import default_prompts
    from quantune.models import build_tiny
    from quantune.ptq.calib import collect_calibration

    cfg = PTQConfig(method="eda-dm", **{**SMALL, "iters": 3})
    report = quantize_pipeline(tiny, cfg, progress=False)
    other = build_tiny()
    calib, _ = collect_calibration(other, cfg, default_prompts())
    by_hand = quantize_model(other.unet, list(calib.batches(cfg.batch_size)), cfg, progress=False)
    assert {k: by_hand[k] for k in ("layers", "units", "shortcut_splits", "losses")} == {
        k: report[k] for k in ("layers", "units", "shortcut_splits", "losses")
    }
    theirs = other.unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in tiny.unet.state_dict().items())


def test_quantize_model_refuses_no_batches(tiny):
    with pytest.raises(QuantuneError, match="non-empty list of batches"):
        quantize_model(tiny.unet, [], PTQConfig(method="minmax"))
