"""Export a trained model to ONNX or TorchScript: ``dfkt.export(...)`` / ``dfkt export model.pt``.

The file holds only the model: weight normalisation (SHOT's heads) is folded into plain weights, a
model whose forward returns a tuple/dict exports its logits, and the exported model is run once on
a random batch and compared with PyTorch (largest absolute difference <= ``atol``, 1e-4) before the
call returns. ONNX needs the optional packages onnx, onnxscript and onnxruntime (``dfkt[onnx]``).
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError, DfktError, ModelError
from .models.split import logits_of

log = logging.getLogger("dfkt")
FORMATS = ("onnx", "torchscript")


class ExportError(DfktError, RuntimeError):
    """The exported model could not be written or does not match PyTorch."""


@dataclass
class Exported:
    path: Path
    format: str
    size_bytes: int
    max_abs_diff: float
    input_shape: tuple


class _LogitsOnly(nn.Module):
    """Exports the logits of a model whose forward returns a tuple / dict (see dfkt.models.logits_of)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Replace weight normalisation (parametrisations and old-style hooks) by the plain weights it gives."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            # by hand, not parametrize.remove_parametrizations: that deletes the property from the
            # parametrised class, which a deep copy shares with the original model
            with torch.no_grad():
                values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            delattr(m, "parametrizations")
            m.__class__ = m.__class__.__bases__[0]
            for name, v in values.items():
                m.register_parameter(name, nn.Parameter(v, requires_grad=False))
        for hook in list(getattr(m, "_forward_pre_hooks", {}).values()):
            if type(hook).__name__ == "WeightNorm":       # torch.nn.utils.weight_norm (deprecated API)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.nn.utils.remove_weight_norm(m, hook.name)
    return model


def _input_shape(model: nn.Module, given) -> tuple:
    if given is not None:
        shape = tuple(int(s) for s in given)
    else:
        shape = getattr(model, "dfkt_input_shape", None)
        if shape is None:
            from .models import _designed_shape

            shape = _designed_shape(model)
        if shape is None:
            raise ConfigError("cannot tell the model's input shape: pass input_shape=(C, H, W) "
                              "(CLI: --input-shape C,H,W).")
        shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {shape}.")
    return shape


def export(model: nn.Module | str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None,
           input_shape: tuple | None = None, atol: float = 1e-4, opset: int | None = None) -> Exported:
    """Write ``model`` (an ``nn.Module`` or a dfkt ``model.pt``) as ``format`` ('onnx' | 'torchscript')
    to ``out`` (default: next to the checkpoint, ``model.onnx`` / ``model.ts``), check it against
    PyTorch and return where it is, its size and the largest difference found.

    The input shape comes from ``input_shape``, else the checkpoint (the shape the model was trained
    on), else the registry model's design. The batch dimension is dynamic."""
    fmt = str(format).lower()
    if fmt not in FORMATS:
        from .errors import suggest

        raise ConfigError(f"unknown export format {format!r}.{suggest(fmt, FORMATS)} Use one of: {', '.join(FORMATS)}.")
    src = None
    if not isinstance(model, nn.Module):
        from .core.checkpoint import load_model

        src = Path(model)
        model = load_model(src)
    shape = _input_shape(model, input_shape)
    m = fold_weight_norm(copy.deepcopy(model).float().cpu().eval())
    for p in m.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *shape), generator=g)
    with torch.no_grad():
        if not torch.is_tensor(m(x)):
            m = _LogitsOnly(m).eval()
    if out is None:
        base = (src.parent / src.stem) if src is not None else Path("model")
        out = base.with_suffix(".onnx" if fmt == "onnx" else ".ts")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a folder; give the file to write (e.g. {out / ('model.' + fmt)}).")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ref = m(x)
    if fmt == "torchscript":
        got = _torchscript(m, x, out)
    else:
        got = _onnx(m, x, out, opset)
    diff = float((torch.as_tensor(got) - ref).abs().max())
    if not diff <= atol:
        raise ExportError(f"the exported {fmt} model differs from PyTorch by {diff:.3g} (> {atol:g}) on a random "
                          f"batch of shape {tuple(x.shape)}; the file {str(out)!r} is not trustworthy.")
    size = out.stat().st_size
    log.info("exported %s (%s, %.1f MB), max |difference| to PyTorch %.2g", out, fmt, size / 1e6, diff)
    return Exported(out, fmt, size, diff, shape)


def _torchscript(m: nn.Module, x: torch.Tensor, out: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # torch.jit's deprecation notice
        try:
            ts = torch.jit.trace(m, x, check_trace=False)
        except Exception as e:  # noqa: BLE001 - tracing failures come in many types
            raise ExportError(f"TorchScript tracing failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                              f"try format='onnx'.") from e
        ts.save(str(out))
        loaded = torch.jit.load(str(out))
        with torch.no_grad():
            return loaded(torch.cat([x, x[:1]]))[:2]     # another batch size: the batch is dynamic


def _onnx(m: nn.Module, x: torch.Tensor, out: Path, opset: int | None) -> torch.Tensor:
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ModelError(f"ONNX export needs the optional package(s) {', '.join(missing)}: "
                         f"pip install 'dfkt[onnx]' (or use format='torchscript').")
    import onnxruntime as ort

    kw = {"opset_version": opset} if opset else {}
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(m, (x,), str(out), input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False,
                                  **kw)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                          f"try format='torchscript'.") from e
    finally:
        quiet.setLevel(level)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x3 = torch.cat([x, x[:1]])
    res = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    return torch.from_numpy(res)[:2]
