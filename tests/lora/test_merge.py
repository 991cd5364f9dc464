"""merge into a base (exact), mix sum (factor sum, not the delta sum), concat (exact), svd (re-factored, error
reported), extract by truncated SVD (exact when the rank suffices)."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.lora import LoraModule, extract, get_lora_weights, merge_into, mix
from quantune.models import build_tiny
from tests.conftest import pipe_outputs


def _lora(seed: int, r: int = 3, out_f: int = 12, in_f: int = 10, alpha: float = 2.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(down=torch.randn(r, in_f, generator=g), up=torch.randn(out_f, r, generator=g), alpha=alpha)


def test_merge_into_base_matches_the_wrapped_model(lora_pipe):
    reference = pipe_outputs(lora_pipe)
    merged = build_tiny()
    assert merge_into(merged, [(get_lora_weights(lora_pipe), 1.0)]) == len(get_lora_weights(lora_pipe))
    for a, b in zip(pipe_outputs(merged), reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_merge_scales_add_up(lora_pipe):
    w = get_lora_weights(lora_pipe)
    a, b = build_tiny(), build_tiny()
    merge_into(a, [(w, 0.5), (w, 0.5)])
    merge_into(b, [(w, 1.0)])
    for x, y in zip(pipe_outputs(a), pipe_outputs(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_merge_refuses_nan(lora_pipe):
    w = get_lora_weights(lora_pipe)
    key = next(iter(w))
    w[key].up[0, 0] = float("nan")
    fresh = build_tiny()
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    with pytest.raises(QuantuneError, match="NaN"):
        merge_into(fresh, [(w, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in fresh.unet.state_dict().items())  # nothing half-merged


def test_mix_sum_is_the_factor_sum_not_the_delta_sum():
    a, b = {"unet.x": _lora(0)}, {"unet.x": _lora(1)}
    out, _ = mix([(a, 0.5), (b, 0.5)], "sum")
    m1, m2 = a["unet.x"], b["unet.x"]
    expected = (0.5 * m1.scale * m1.up + 0.5 * m2.scale * m2.up) @ (0.5 * m1.down + 0.5 * m2.down)
    torch.testing.assert_close(out["unet.x"].delta(), expected, atol=1e-5, rtol=0)
    delta_sum = 0.5 * m1.delta() + 0.5 * m2.delta()
    assert (out["unet.x"].delta() - delta_sum).norm() > 0.1 * delta_sum.norm()  # the cross terms are real


def test_mix_sum_needs_equal_ranks():
    with pytest.raises(QuantuneError, match="concat"):
        mix([({"unet.x": _lora(0, r=2)}, 1.0), ({"unet.x": _lora(1, r=3)}, 1.0)], "sum")


def test_mix_concat_is_exact_and_ranks_add():
    a, b = {"unet.x": _lora(0, r=2), "unet.y": _lora(2)}, {"unet.x": _lora(1, r=3, alpha=7.0)}
    out, _ = mix([(a, 0.7), (b, -0.3)], "concat")
    assert out["unet.x"].rank == 5 and out["unet.y"].rank == 3
    torch.testing.assert_close(
        out["unet.x"].delta(), 0.7 * a["unet.x"].delta() - 0.3 * b["unet.x"].delta(), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(out["unet.y"].delta(), 0.7 * a["unet.y"].delta(), atol=1e-5, rtol=0)


def test_mix_svd_exact_at_full_rank_and_reports_truncation():
    a, b = {"unet.x": _lora(0)}, {"unet.x": _lora(1)}
    exact, report = mix([(a, 1.0), (b, 1.0)], "svd", rank=6)
    torch.testing.assert_close(exact["unet.x"].delta(), a["unet.x"].delta() + b["unet.x"].delta(), atol=1e-4, rtol=0)
    assert report.max_error < 1e-5
    low, report = mix([(a, 1.0), (b, 1.0)], "svd", rank=2)
    assert low["unet.x"].rank == 2 and 0.05 < report.max_error < 1.0
    with pytest.raises(QuantuneError, match="--rank"):
        mix([(a, 1.0)], "svd")


def test_mix_conv_modules_concat_and_svd():
    g = torch.Generator().manual_seed(0)
    conv = LoraModule(down=torch.randn(2, 4, 3, 3, generator=g), up=torch.randn(6, 2, 1, 1, generator=g), alpha=2.0)
    other = LoraModule(down=torch.randn(3, 4, 3, 3, generator=g), up=torch.randn(6, 3, 1, 1, generator=g), alpha=1.0)
    want = conv.delta() + 2 * other.delta()
    cat, _ = mix([({"unet.c": conv}, 1.0), ({"unet.c": other}, 2.0)], "concat")
    torch.testing.assert_close(cat["unet.c"].delta(), want, atol=1e-4, rtol=0)
    svd, rep = mix([({"unet.c": conv}, 1.0), ({"unet.c": other}, 2.0)], "svd", rank=5)
    assert svd["unet.c"].down.shape == (5, 4, 3, 3) and svd["unet.c"].up.shape == (6, 5, 1, 1)
    torch.testing.assert_close(svd["unet.c"].delta(), want, atol=1e-4, rtol=0)


def test_extract_recovers_a_merged_lora(lora_pipe):
    w = get_lora_weights(lora_pipe)
    tuned = build_tiny()
    merge_into(tuned, [(w, 1.0)])
    got, report = extract(build_tiny(), tuned, rank=4, clamp_quantile=1.0)
    assert set(got) == set(w)
    assert report.max_error < 1e-4
    for key, mod in w.items():
        torch.testing.assert_close(got[key].delta(), mod.delta(), atol=1e-4, rtol=0)


def test_extract_clamps_and_errors(lora_pipe):
    tuned = build_tiny()
    merge_into(tuned, [(get_lora_weights(lora_pipe), 1.0)])
    clamped, report = extract(build_tiny(), tuned, rank=2, clamp_quantile=0.9)
    assert report.max_error > 0
    for mod in clamped.values():
        assert mod.rank <= 2
    with pytest.raises(QuantuneError, match="nothing to extract"):
        extract(build_tiny(), build_tiny(), rank=2)


@pytest.mark.parametrize("mode", ["sum", "concat", "svd"])
def test_mix_refuses_loras_of_different_models(mode):
    a = {"unet.x": _lora(0, r=4, out_f=8, in_f=16)}
    b = {"unet.x": _lora(1, r=4, out_f=8, in_f=24)}  # the same module name, another model's width
    with pytest.raises(QuantuneError, match="different models"):
        mix([(a, 1.0), (b, 1.0)], mode, rank=2)
