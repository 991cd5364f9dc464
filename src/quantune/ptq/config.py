"""PTQConfig: the post-training quantization method and its hyperparameters (defaults: the EDA-DM paper, arXiv
2401.04585, and its reference code; docs/quantization.md).

The flat fields are the `quantune quantize` flags. `__post_init__` converts the bit widths into the quantization
core's vocabulary (quant/config.py): `weight` (WeightQuant: per output channel, symmetric at 8 bits so the codes
fit int8 for the integer kernels, asymmetric below; the method's range search), `act` and `attn` (ActQuant, or
None: `abits=None` is weight-only, W4A16 / W8A16, and then no activation anywhere is quantized). It also builds the
method's own options (`options`, the dataclass the method registers in ptq/methods/) from the fields of the same
name and `extra_options`, and validates them there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from quantune.errors import QuantuneError
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.primitives import check_bits
from quantune.targets import listed


@dataclass
class PTQConfig:
    """Settings of one PTQ run: method, bits, calibration, reconstruction budget and the layers kept at higher
    precision (the module docstring says what `__post_init__` derives)."""

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
    add_loss: float = 0.8  # FBR's weight of the inner-layer terms (eda-dm's option)
    qdrop: float = 0.5  # QDrop probability (eda-dm's option)
    tdac_r: float = 0.3  # TDAC density radius (paper: 3.0 CIFAR/ImageNet, 0.3 LSUN/COCO; eda-dm's option)
    tdac_lambda: float = 5.0  # TDAC variety weight (paper: 1.2 CIFAR/ImageNet, 1.0 LSUN, 5.0 COCO; eda-dm's option)
    attn_bits: int | None = 8  # q, k, v and softmax output of every attention; None: attention stays float
    # layers kept at 8-bit weights (EDA-DM: the first layer, the time embedding's linear_1, and the last conv)
    # None: the model family's (families/: SD's are time_embedding.linear_1 and conv_out, as EDA-DM keeps them)
    keep_8bit: list[str] | None = None
    act_fp: list[str] | None = None  # inputs left unquantized; None: the family's (SD: conv_out, as EDA-DM)
    keep_fp: list[str] = field(default_factory=list)  # layers not quantized (names, dotted suffixes or regexes)
    smooth: float | None = None  # SmoothQuant's migration strength alpha in [0, 1] (ptq/smooth.py); None: off
    guidance_scale: float | None = None  # the calibration sampler's; None: the pipeline's own default (FLUX: 3.5)
    resolution: int | None = None  # calibration image size in pixels; None: the pipeline's default
    seed: int = 0
    extra_options: dict = field(default_factory=dict)  # options of a method that PTQConfig has no field for
    # derived in __post_init__ (not settings):
    weight: WeightQuant = field(init=False, repr=False, compare=False)
    act: ActQuant | None = field(init=False, repr=False, compare=False)
    attn: ActQuant | None = field(init=False, repr=False, compare=False)
    options: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from quantune.ptq.methods import method_class  # deferred: the methods import PTQConfig

        method = method_class(self.method)
        self._check_bits()
        self._check_budget()
        if self.lr_w is None:
            self.lr_w = 0.5 if self.wbits <= 4 else (5e-3 if self.wbits < 8 else 5e-4)
        self.weight = WeightQuant(self.wbits, per_channel=True, symmetric=self.wbits == 8, search=method.search)
        self.act = ActQuant(self.abits, method.search) if self.abits is not None else None
        self.attn = ActQuant(self.attn_bits, method.search) if self.attn_bits is not None else None
        self.options = method.build_options(self)

    def _check_bits(self) -> None:
        check_bits(self.wbits, "wbits")
        if self.abits is not None:
            check_bits(self.abits, "abits", low=4, high=16)
        if self.abits is None:
            self.attn_bits = None  # weight-only (W4A16 / W8A16): no activation anywhere is quantized
        if self.attn_bits is not None:
            check_bits(self.attn_bits, "attn_bits", low=4, high=16)

    def _check_budget(self) -> None:
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
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise QuantuneError(f"smooth = {self.smooth} must be in [0, 1] (SmoothQuant's alpha; 0.5 in the paper)")
        if self.smooth is not None and self.abits is None:
            raise QuantuneError("smooth needs quantized activations: it migrates their outliers; drop --smooth")
        if self.round_reg < 0:
            raise QuantuneError(f"round_reg = {self.round_reg} must be 0 or more")
        if self.lr_a <= 0:
            raise QuantuneError(f"lr_a = {self.lr_a} must be positive")
        if self.lr_w is not None and self.lr_w <= 0:
            raise QuantuneError(f"lr_w = {self.lr_w} must be positive")

    def weight_for(self, name: str) -> WeightQuant:
        """The weight quantization of layer `name`: 8-bit symmetric for the `keep_8bit` layers, else `weight`."""
        if listed(self.keep_8bit or [], name):
            return dataclasses.replace(self.weight, bits=8, symmetric=True)
        return self.weight

    def act_for(self, name: str) -> ActQuant | None:
        """The input quantization of layer `name`: None (float) for the `act_fp` layers, else `act`."""
        return None if listed(self.act_fp or [], name) else self.act

    def for_family(self, family) -> PTQConfig:
        """This config with the lists left unset (None) taken from a model family (families/base.py)."""
        changes = {"keep_8bit": list(family.ptq_keep_8bit)} if self.keep_8bit is None else {}
        changes |= {"act_fp": list(family.ptq_act_fp)} if self.act_fp is None else {}
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def learns(self) -> bool:
        """Does the method reconstruct (learn rounding / step sizes), or only calibrate ranges?"""
        from quantune.ptq.methods import method_class  # deferred: the methods import PTQConfig

        return method_class(self.method).learns(self)

    def to_dict(self) -> dict:
        """The settings (the init fields), as saved in the PTQ report."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
