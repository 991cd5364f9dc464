"""`OpenVINOModule`: a quantune integer denoiser run by OpenVINO on the CPU, called exactly like the denoiser.

The module holds the PyTorch integer model (`.model`, unchanged: its state dict, LoRA targets and saving are the
model's) and, per input signature (the argument structure and every tensor's shape and dtype), one OpenVINO model
converted from the model's export view (quant/ov_export.py: quantune's integers and scales as FakeQuantize and int8
constants) and compiled for the CPU with OpenVINO's defaults (on a CPU with native bf16 the float ops run in bf16).
The conversion runs at the first call of a signature and is logged (like torch.compile's first call); a pipeline
calls one signature for all its steps. Calls run the PyTorch model instead, with the reason logged once, when
gradients are on, when an input or the model is not on the CPU, when OpenVINO is missing, or when the conversion
of that signature failed. Attributes the module lacks (`config`, `dtype`, `device`, ...) are the model's, so
diffusers' pipelines use it in the denoiser's place. What a trace bakes in besides the inputs is part of the
signature too: every module's `multiplier` (LoRA strengths) and the tensors' version counters (in-place changes,
`load_state_dict`), so a strength grid or new weights convert again; `reset()` forgets every conversion. `calls`
counts the calls OpenVINO and PyTorch ran. Outputs: the model's output class (`.sample`), or a tuple with
`return_dict=False`.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings

import torch
from torch import nn

from quantune.quant.ov_export import export_counts, export_view, openvino_missing

logger = logging.getLogger(__name__)


def _flatten(value, path: str, leaves: list, key: list) -> None:
    """Tensors of a (nested dict / list / tuple) argument into `leaves`, and the signature into `key`."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        key.append((path, tuple(value.shape), str(value.dtype)))
    elif isinstance(value, dict):
        for k in sorted(value):
            _flatten(value[k], f"{path}.{k}", leaves, key)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", leaves, key)
    else:
        key.append((path, repr(value)))


def _rebuild(value, tensors):
    """`value` with its tensors replaced, in `_flatten`'s order, by the next of iterator `tensors`."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, dict):
        rebuilt = {k: _rebuild(value[k], tensors) for k in sorted(value)}
        return {k: rebuilt[k] for k in value}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


def _takes_return_dict(model: nn.Module) -> bool:
    return "return_dict" in inspect.signature(model.forward).parameters


class _Traced(nn.Module):
    """The model with the tensors of one call's arguments positional (what tracing takes); returns the prediction
    (a diffusers output's first field, or the tensor a plain module returns) and records the output class."""

    def __init__(self, model: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model, self.kwargs = model, kwargs
        self.extra = {"return_dict": True} if _takes_return_dict(model) else {}
        self.output_type: type | None = None

    def forward(self, *tensors):
        out = self.model(**_rebuild(self.kwargs, iter(tensors)), **self.extra)
        if isinstance(out, torch.Tensor):
            return out
        self.output_type = type(out)
        return out[0]


class _Compiled:
    """One converted signature: the compiled OpenVINO model and the model's output class."""

    def __init__(self, compiled, output_type: type | None) -> None:
        self.compiled, self.output_type = compiled, output_type

    def __call__(self, leaves: list[torch.Tensor], dtype: torch.dtype, return_dict: bool | None):
        pred = torch.from_numpy(self.compiled([t.detach().contiguous().numpy() for t in leaves])[0].copy())
        pred = pred.to(dtype)
        if self.output_type is None:  # a module that returns a tensor
            return pred
        return self.output_type(pred) if return_dict else (pred,)


def export_converter(model: nn.Module, bound: dict, leaves: list[torch.Tensor], attention: str = "fused"):
    """(OpenVINO model, output class) of `model`'s export view (quant/ov_export.py) traced on one call."""
    import openvino as ov

    with torch.no_grad(), export_view(model, attention) as view, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks fixed by the trace: expected
        traced = _Traced(view, bound).eval()
        return ov.convert_model(traced, example_input=tuple(leaves)), traced.output_type


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (a forward's **kwargs merged in)."""
    bound = dict(signature.bind(*args, **kwargs).arguments)
    var = [n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]
    return {**bound.pop(var[0], {}), **bound} if var else bound


def flat_inputs(model: nn.Module, kwargs: dict, signature: inspect.Signature | None = None) -> list[torch.Tensor]:
    """The tensors of a call `model(**kwargs)` in the order an OpenVINOModule's converted model takes them
    (`signature`: model.forward's, when the caller keeps it)."""
    leaves: list = []
    _flatten(_bind(signature or inspect.signature(model.forward), (), kwargs), "", leaves, [])
    return leaves


class OpenVINOModule(nn.Module):
    """`model` run by OpenVINO without gradients on the CPU (module docstring); `config`: OpenVINO compile options;
    `converter(model, bound kwargs, tensors) -> (openvino model, output class)`: how a signature is converted
    (default: quantune's export view; the benchmarks pass NNCF's quantization of a float model)."""

    def __init__(self, model: nn.Module, config: dict | None = None, converter=export_converter) -> None:
        super().__init__()
        self.model, self.converter = model, converter
        self.ov_config = dict(config or {})
        self._signature = inspect.signature(model.forward)
        self._return_dict = _takes_return_dict(model)
        self._compiled: dict[tuple, _Compiled | None] = {}  # None: that signature's conversion failed
        self._noted: set[str] = set()
        self._core = None
        self.calls = {"openvino": 0, "torch": 0}  # what ran each call (describe / tests / benchmarks read it)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True) if self._return_dict else None
        extra = {"return_dict": return_dict} if self._return_dict else {}
        multipliers, versions, off_cpu = self._scan()
        reason = self._torch_reason(args, kwargs, off_cpu)
        if reason is not None:
            self._note(f"the {type(self.model).__name__} runs in PyTorch: {reason}")
            return self._torch(args, kwargs, extra)
        bound = _bind(self._signature, args, kwargs)
        leaves, key = [], []
        _flatten(bound, "", leaves, key)
        key = (tuple(key), multipliers, versions)
        if key not in self._compiled:
            self._compiled[key] = self._convert(bound)
        compiled = self._compiled[key]
        if compiled is None:
            return self._torch(args, kwargs, extra)
        self.calls["openvino"] += 1
        floats = [t.dtype for t in leaves if t.is_floating_point()]
        return compiled(leaves, getattr(self.model, "dtype", floats[0] if floats else torch.float32), return_dict)

    def _torch(self, args, kwargs, extra):
        self.calls["torch"] += 1
        return self.model(*args, **extra, **kwargs)

    def _scan(self) -> tuple[tuple, int, bool]:
        """What a trace bakes in besides the inputs, in one pass over the model per call (instance dicts, so it stays
        well under a millisecond beside zoo:emoji's few-millisecond forward): every module's `multiplier` (LoRA
        strengths: a float in the graph) and the tensors' version counters (in-place changes, load_state_dict: a
        change converts again); and whether any tensor is off the CPU."""
        multipliers, versions, off_cpu = [], 0, False
        for module in self.model.modules():
            state = module.__dict__
            if "multiplier" in state or hasattr(type(module), "multiplier"):  # an attribute, or a property
                multipliers.append(float(module.multiplier))
            for t in (*state["_parameters"].values(), *state["_buffers"].values()):
                if t is not None:
                    versions += t._version + t.data_ptr()  # a replaced tensor (another adapter) differs too
                    off_cpu = off_cpu or not t.is_cpu
        return tuple(multipliers), versions, off_cpu

    def _torch_reason(self, args, kwargs, model_off_cpu: bool) -> str | None:
        if (missing := openvino_missing()) is not None:
            return missing
        if torch.is_grad_enabled():
            return "gradients are on (OpenVINO runs inference only)"
        tensors: list = []
        _flatten((args, kwargs), "", tensors, [])
        if model_off_cpu or any(not t.is_cpu for t in tensors):
            return "the model or its inputs are not on the CPU"
        return None

    def _note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            logger.info(message)

    def _convert(self, bound: dict) -> _Compiled | None:
        start = time.perf_counter()
        leaves: list = []
        _flatten(bound, "", leaves, [])
        training = self.model.training
        try:
            import openvino as ov  # deferred: optional (ov_export.openvino_missing)

            ov_model, output_type = self.converter(self.model, bound, leaves)
            ov_model.reshape({i: ov.PartialShape(list(t.shape)) for i, t in enumerate(leaves)})
            self._core = self._core or ov.Core()
            compiled = _Compiled(self._core.compile_model(ov_model, "CPU", self.ov_config), output_type)
            compiled(leaves, torch.float32, False)  # one inference now: a mismatch falls back here, not later
        except Exception as e:  # noqa: BLE001 - any converter / plugin failure: run PyTorch, say why
            logger.warning("OpenVINO could not convert the %s (%s: %s): it runs in PyTorch for these inputs",
                           type(self.model).__name__, type(e).__name__, e)  # fmt: skip
            return None
        finally:
            self.model.train(training)  # tracing ran it in eval mode
        what = ""
        if self.converter is export_converter:
            counts = ", ".join(f"{n} {k}" for k, n in export_counts(self.model).items())
            what = f" (quantune's integers and scales: {counts})"
        shapes = ", ".join(str(list(t.shape)) for t in leaves)
        logger.info("OpenVINO: converted the %s for inputs %s in %.1f s%s", type(self.model).__name__, shapes,
                    time.perf_counter() - start, what)  # fmt: skip
        return compiled

    def reset(self) -> None:
        """Forget the converted signatures (the next call converts again): after changing the model's weights."""
        self._compiled.clear()

    def _apply(self, fn, recurse: bool = True):
        self.reset()  # .to() / .half(): the converted models hold the old tensors
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"signatures={len(self._compiled)}"
