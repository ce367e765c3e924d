"""Checkpoints: a deployable one (the model alone + method, config, metrics) and a resume one.

Files are written atomically (temporary file in the same folder, fsync, rename), so a kill during a
save leaves the previous checkpoint intact. Each carries a format tag and version; a truncated or
foreign file raises :class:`CheckpointError` instead of silently starting again.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

FORMAT_VERSION = 1
MODEL_FORMAT = "dfkt-model"
RESUME_FORMAT = "dfkt-resume"
RESUME_NAME = "resume.pt"
MODEL_NAME = "model.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (tmp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path: str | Path, expect: str | None = None) -> dict:
    """Load a dfkt checkpoint, checking it is complete, ours, of the expected kind and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; check the path "
                              f"(resume files are '<checkpoint_dir>/{RESUME_NAME}').")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}). "
            f"It is truncated, corrupted or not a dfkt checkpoint; delete it to start afresh or point to "
            f"another file.") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in (MODEL_FORMAT, RESUME_FORMAT):
        raise CheckpointError(f"{str(path)!r} is not a dfkt checkpoint (no dfkt format tag). To use "
                              f"plain weights, build the model yourself and call model.load_state_dict().")
    if expect is not None and fmt != expect:
        raise CheckpointError(f"{str(path)!r} is a {fmt!r} file where a {expect!r} file was expected.")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {obj.get('version')}, newer than this "
                              f"dfkt ({FORMAT_VERSION}); upgrade dfkt.")
    return obj


def load_state_strict(model: nn.Module, state: dict, where: str = "checkpoint") -> None:
    """load_state_dict with an error that names the architecture mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()
        raise CheckpointError(
            f"the {where} was saved from another architecture than {type(model).__name__}: "
            f"{' '.join(m.strip() for m in msg[:3])[:400]}. Build the same model (name, num_classes, "
            f"width) that made it.") from None


def model_spec(model: nn.Module) -> dict | None:
    spec = getattr(model, "dfkt_spec", None)
    return dict(spec) if spec else None


# what dfkt knows about a model besides its weights: the head's module name (when dfkt had to find or
# was told it), the class names behind the label indices, and the input shape it was trained on
MODEL_INFO = {"head": "dfkt_head", "classes": "dfkt_classes", "input_shape": "dfkt_input_shape"}


def model_info(model: nn.Module) -> dict:
    return {k: getattr(model, a) for k, a in MODEL_INFO.items() if getattr(model, a, None) is not None}


def save_model(path: str | Path, model: nn.Module, method: str | None = None, config: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Deployable checkpoint: the model's weights, how to rebuild it, and what made it."""
    from .distributed import unwrap

    model = unwrap(model)
    return atomic_save({
        "format": MODEL_FORMAT, "version": FORMAT_VERSION, "model_spec": model_spec(model),
        "model_info": model_info(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "method": method, "config": config or {}, "metrics": metrics or {},
    }, path)


def load_model(path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a deployable checkpoint (or the model inside a resume one).

    Models built by ``dfkt.models.build_model`` (registry, ``timm:NAME``, ``torchvision:NAME``) are
    rebuilt from the saved spec; for your own architecture pass an instance as ``model``.
    """
    obj = read_checkpoint(path)
    state = obj["state_dict"] if obj["format"] == MODEL_FORMAT else obj["model_state"]
    if model is None:
        spec = obj.get("model_spec")
        if not spec:
            raise CheckpointError(f"{str(path)!r} holds a custom model without a dfkt spec; pass the model: "
                                  f"dfkt.load(path, model=MyNet()).")
        from ..models import build_model

        kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k != "weights_path"}  # weights: the file's
        model = build_model(spec["name"], num_classes=spec["num_classes"], **kwargs)
    load_state_strict(model, state, where=f"checkpoint {str(path)!r}")
    for key, attr in MODEL_INFO.items():
        value = (obj.get("model_info") or {}).get(key)
        if value is not None:
            setattr(model, attr, value)
    model.dfkt_meta = {k: obj.get(k) for k in ("method", "config", "metrics")}
    return model.to(device).eval()
