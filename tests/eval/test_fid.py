"""FID with the shipped OpenMoji feature network: a set against itself is ~0, and it grows with corruption."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.eval import fid
from quantune.eval.features import load_feature_net


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    from quantune.data import openmoji_dataset, to_tensor

    data = openmoji_dataset(size=32, subset=200, cache_dir=tmp_path_factory.mktemp("cache"))
    return torch.stack([(to_tensor(data[i]["image"], 32) + 1) / 2 for i in range(len(data))])  # [200, 3, 32, 32]


def test_feature_net_shape_and_any_size():
    net = load_feature_net()
    assert net(torch.rand(3, 3, 32, 32)).shape == (3, 128)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 128)


def test_fid_of_a_set_against_itself_is_zero(emoji):
    assert abs(fid(emoji, emoji)) < 1e-2


def test_fid_grows_with_corruption(emoji):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(emoji.shape, generator=g)
    scores = [fid((emoji + s * noise).clamp(0, 1), emoji) for s in (0.05, 0.2, 0.5)]
    assert 0 < scores[0] < scores[1] < scores[2], scores
    assert fid(torch.rand_like(emoji), emoji) > scores[1]


def test_pil_input_and_bad_input(emoji):
    from PIL import Image

    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")) for x in emoji[:20]]
    assert fid(pil, pil) < 1e-2
    with pytest.raises(QuantuneError, match="at least 2"):
        fid(emoji[:1], emoji)
    with pytest.raises(QuantuneError, match="not found"):
        fid(emoji, emoji, feature="/no/such/clip")


def test_clip_features_from_a_local_folder(emoji, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    same = fid(emoji[:50], emoji[:50], feature=tmp_path / "clip")
    other = fid(torch.rand(50, 3, 32, 32), emoji[:50], feature=tmp_path / "clip")
    assert abs(same) < 1e-2 < other
    with pytest.raises(QuantuneError, match="no CLIP model"):
        fid(emoji, emoji, feature=tmp_path)


def test_fid_warns_when_images_do_not_outnumber_features(emoji, caplog):
    with caplog.at_level("WARNING", logger="quantune.eval.fid"):
        fid(emoji[:64], emoji[64:128])  # 64 images, 128 feature dimensions
    assert "rank-deficient" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantune.eval.fid"):
        fid(emoji, emoji)
    assert "rank-deficient" not in caplog.text


def test_processor_pixels_resize_shortest_edge_and_centre_crop():
    from quantune.eval.fid import processor_pixels

    x = torch.zeros(1, 3, 32, 64)
    x[..., 12:52] = 1.0  # a white centre band, a little wider than the crop of a 2:1 image (16:48)
    out = processor_pixels(x, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (1, 3, 16, 16) and out.min() > 0.99  # the centre only: squashed, the black sides would show
    square = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = torch.nn.functional.interpolate(square, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(processor_pixels(square, 16, (0.0,) * 3, (1.0,) * 3), plain, atol=1e-6)
