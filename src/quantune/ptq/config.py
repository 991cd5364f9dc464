"""PTQConfig: the post-training quantization method and its hyperparameters (defaults: spec/eda-dm.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from quantune.errors import QuantuneError
from quantune.quant.primitives import check_bits

METHODS = ("minmax", "qdiffusion", "eda-dm")


@dataclass
class PTQConfig:
    method: str = "eda-dm"
    wbits: int = 8
    abits: int | None = 8  # None: weight-only (W4A16 / W8A16)
    calib_samples: int = 256  # N calibration samples (trajectories); EDA-DM: 1024, 256 for Stable Diffusion
    steps: int = 20  # sampler steps of the calibration trajectories
    iters: int = 1000  # reconstruction iterations per block / layer (minmax: none)
    batch_size: int = 32
    lr_w: float | None = None  # AdaRound's learning rate; None: 0.5 at W4 or fewer bits, 5e-3 at W5..W7, 5e-4 at W8
    round_reg: float = 0.01  # AdaRound's rounding-regulariser weight (BRECQ, Q-Diffusion); EDA-DM's reference: 0
    lr_a: float = 1e-3  # activation step sizes (EDA-DM's joint reconstruction)
    add_loss: float = 0.8  # FBR's weight of the inner-layer terms (eda-dm only)
    qdrop: float = 0.5  # QDrop probability (eda-dm only)
    tdac_r: float = 0.3  # TDAC density radius (spec: 3.0 CIFAR/ImageNet, 0.3 LSUN/COCO)
    tdac_lambda: float = 5.0  # TDAC variety weight (spec: 1.2 CIFAR/ImageNet, 1.0 LSUN, 5.0 COCO)
    attn_bits: int | None = 8  # q, k, v and softmax output of every attention; None: attention stays float
    # layers kept at 8-bit weights (EDA-DM: the first layer, the time embedding's linear_1, and the last conv)
    keep_8bit: list[str] = field(default_factory=lambda: ["time_embedding.linear_1", "conv_out"])
    act_fp: list[str] = field(default_factory=lambda: ["conv_out"])  # inputs left unquantized (EDA-DM: conv_out)
    keep_fp: list[str] = field(default_factory=list)  # layers not quantized (names, dotted suffixes or regexes)
    guidance_scale: float = 7.5
    resolution: int | None = None  # calibration image size in pixels; None: the pipeline's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantuneError(f"method = {self.method!r} is not supported: choose one of {', '.join(METHODS)}")
        check_bits(self.wbits, "wbits")
        if self.abits is not None:
            check_bits(self.abits, "abits", low=4, high=16)
        if self.abits is None:
            self.attn_bits = None  # weight-only (W4A16 / W8A16): no activation anywhere is quantized
        if self.attn_bits is not None:
            check_bits(self.attn_bits, "attn_bits", low=4, high=16)
        for name in ("calib_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantuneError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise QuantuneError(f"resolution = {self.resolution} must be a multiple of 8, at least 8")
        if self.iters < 0:
            raise QuantuneError(f"iters = {self.iters} must be 0 or more")
        if self.calib_samples < self.steps:
            raise QuantuneError(
                f"calib_samples = {self.calib_samples} is fewer than the {self.steps} sampler steps: TDAC needs at "
                "least one sample per step; raise --calib-samples or lower --steps"
            )
        for name in ("round_reg", "add_loss", "tdac_lambda"):
            if getattr(self, name) < 0:
                raise QuantuneError(f"{name} = {getattr(self, name)} must be 0 or more")
        for name in ("lr_a", "tdac_r"):
            if getattr(self, name) <= 0:
                raise QuantuneError(f"{name} = {getattr(self, name)} must be positive")
        if self.lr_w is not None and self.lr_w <= 0:
            raise QuantuneError(f"lr_w = {self.lr_w} must be positive")
        if not 0.0 <= self.qdrop < 1.0:
            raise QuantuneError(f"qdrop = {self.qdrop} must be in [0, 1)")
        if self.lr_w is None:
            self.lr_w = 0.5 if self.wbits <= 4 else (5e-3 if self.wbits < 8 else 5e-4)

    @property
    def learns(self) -> bool:
        """Does the method reconstruct (learn rounding / step sizes), or only calibrate ranges?"""
        return self.method != "minmax" and self.iters > 0

    @property
    def search(self) -> str:
        return "minmax" if self.method == "minmax" else "l2.4"

    def wsym(self, bits: int) -> bool:
        """8-bit weights are symmetric (their integers fit int8 for the integer kernels); fewer bits asymmetric."""
        return bits == 8
