"""Per-image metrics on known inputs (PSNR, SSIM), CLIP-T / DINO with tiny local models, `quantune eval` end to end,
and the errors of missing weights or settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantune.cli import main
from quantune.errors import QuantuneError
from quantune.eval import metrics as M
from quantune.eval.run import EvalConfig


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_psnr_and_ssim_known_values():
    x = _images() * 0.8
    assert M.psnr(x, x) == [99.0] * 3  # identical: capped
    assert M.psnr(x + 0.1, x) == pytest.approx([20.0] * 3, abs=1e-3)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert M.ssim(x, x) == pytest.approx([1.0] * 3)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert all(v < 0.7 for v in M.ssim(noisy, x))
    with pytest.raises(QuantuneError, match="pair images one to one"):
        M.psnr(x[:2], x)


@pytest.fixture
def tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from quantune.models.zoo import load_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=load_tokenizer().vocab_size, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    load_tokenizer().save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_t_is_the_cosine_of_the_pair(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    x = _images(2)
    scores = M.clip_t(x, ["cat face", "red apple"], tiny_clip)
    model, tok = CLIPModel.from_pretrained(str(tiny_clip)), CLIPTokenizer.from_pretrained(str(tiny_clip))
    with torch.no_grad():
        pixels = M.processor_pixels(x, 32, M.CLIP_MEAN, M.CLIP_STD)
        img = M.projected(model.get_image_features(pixel_values=pixels))
        txt = M.projected(model.get_text_features(**tok(["cat face", "red apple"], padding=True, return_tensors="pt")))
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    assert scores == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)
    assert scores == M.clip_t(x, ["cat face", "red apple"], tiny_clip)


def test_dino_subject_similarity(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from quantune.eval.similarity import subject_similarity

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")  # fmt: skip
    net = M.DinoFeatures(tmp_path / "dino")
    x = _images(1)
    assert subject_similarity(x, x, net) == pytest.approx(1.0, abs=1e-5)  # an image against itself
    assert subject_similarity(_images(4, seed=2), x, net) < 1.0
    from quantune.eval.similarity import similarity_per_image

    rows = similarity_per_image(torch.cat([x, _images(2, seed=3)]), torch.cat([x, x]), net)
    assert len(rows) == 3 and rows[0] == pytest.approx(1.0, abs=1e-5) and max(rows[1:]) < 1.0
    assert subject_similarity(_images(4, seed=2), x, net) == pytest.approx(
        sum(similarity_per_image(_images(4, seed=2), x, net)) / 4
    )


def test_missing_weights_are_errors(tmp_path):
    with pytest.raises(QuantuneError, match="--clip"):
        M.clip_t(_images(1), ["x"], None)
    with pytest.raises(QuantuneError, match="no DINO model"):
        M.DinoFeatures(tmp_path / "nowhere")
    alexnet = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not alexnet.is_file():  # never a download: an error naming where the weights go
        with pytest.raises(QuantuneError, match="LPIPS needs torchvision's AlexNet weights"):
            M.lpips(_images(1), _images(1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(metrics=["fid", "sharpness"]), "unknown metric"),
        (dict(metrics=["psnr"]), "--compare-model"),
        (dict(metrics=["clip-t"]), "--clip DIR"),
        (dict(metrics=["dino"], dino="d"), "--instance DIR"),
        (dict(metrics=["fid"], prompts="p.txt"), "--reference DIR"),
    ],
)
def test_bad_eval_config(kwargs, match):
    with pytest.raises(QuantuneError, match=match):
        EvalConfig(**kwargs)


def test_eval_cli_end_to_end(tmp_path, capsys):
    """zoo:tiny against itself: the same prompts and seeds give the same images, so PSNR is capped, SSIM 1."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", "zoo:tiny", "--metrics", "fid,glyph,psnr,ssim", "--n", "4", "--steps", "2", "--size",
            "32", "--compare-model", "zoo:tiny", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "4 images" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert result["psnr"] == 99.0 and result["ssim"] == pytest.approx(1.0) and result["fid"] > 0
    rows = json.loads((out / "rows.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1, 2, 3] and all((out / r["image"]).is_file() for r in rows)
    assert all(1 <= r["glyph_rank"] <= 1463 for r in rows)
    assert result["glyph_top1"] == sum(r["glyph_rank"] == 1 for r in rows) / 4 <= result["glyph_top5"]
    assert (out / "grid.png").is_file() and (out / "rows.csv").is_file()
    assert main(["eval", "--model", "zoo:tiny", "--metrics", "clip-t", "--out", str(tmp_path / "x")]) == 2
    assert "--clip DIR" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_clip_i_from_a_full_clip_folder(tiny_clip):
    from quantune.eval.fid import ClipFeatures
    from quantune.eval.similarity import subject_similarity

    x = _images(2)
    assert subject_similarity(x[:1], x[:1], ClipFeatures(tiny_clip)) == pytest.approx(1.0, abs=1e-5)


def test_partial_clip_folder_is_refused(tmp_path):
    """A vision-only CLIP folder has no projection: transformers would draw one at random; quantune refuses."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from quantune.eval.fid import ClipFeatures

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "vision")
    with pytest.raises(QuantuneError, match="lacks .* CLIP weights"):
        ClipFeatures(tmp_path / "vision")


def test_eval_applies_the_lora_scale(lora_pipe, tmp_path):
    """--lora FILE:0 gives the base model's images; FILE:1 does not."""
    from quantune.eval.run import EvalConfig, evaluate
    from quantune.formats import write_lora
    from quantune.lora import get_lora_weights

    lora = write_lora(get_lora_weights(lora_pipe), tmp_path / "lora.safetensors", "quantune")
    cfg = EvalConfig(metrics=["psnr"], n=2, steps=2, size=32, compare_model="zoo:tiny")
    assert evaluate("zoo:tiny", cfg, tmp_path / "off", [f"{lora}:0"])["psnr"] == 99.0
    assert evaluate("zoo:tiny", cfg, tmp_path / "on", [f"{lora}:1"])["psnr"] < 60


def test_bad_folders_fail_before_generation(tmp_path, capsys, monkeypatch):
    import quantune.eval.run as run

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the inputs")

    monkeypatch.setattr(run, "sample_images", no_generation)
    argv = ["eval", "--model", "zoo:tiny", "--metrics", "dino", "--instance", str(tmp_path / "none"), "--dino",
            str(tmp_path), "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2 and "--instance" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    argv = ["eval", "--model", "zoo:tiny", "--out", str(tmp_path / "busy")]
    assert main(argv) == 2 and "holds other files" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("cat face\na photo of a dog\n")
    argv = ["eval", "--model", "zoo:tiny", "--metrics", "glyph", "--prompts", str(tmp_path / "prompts.txt"), "--out",
            str(tmp_path / "g")]  # fmt: skip
    assert main(argv) == 2 and "not OpenMoji names: ['a photo of a dog']" in capsys.readouterr().err
