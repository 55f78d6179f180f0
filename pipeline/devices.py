"""Where a run computes and how precisely: the device, the CUDA graph, the precision mode, and
the versions and numeric settings that can change its results (the ``env.*`` tags)."""
from __future__ import annotations

import contextlib

import torch

from . import engine
from .config import Config, ConfigError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; an explicit one must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        here = ", ".join(["auto"] + [d for d, ok in available.items() if ok])
        raise ConfigError("device", f"{name} was asked for but no {name.upper()} device is "
                                    f"visible; allowed here: {here}")
    return torch.device(name)


def device_notes(device: torch.device) -> list[str]:
    """What works differently on this device, said once at the start of a run."""
    if device.type != "mps":
        return []
    return ["note: MPS has no float64, so the probes use float32 with scale-by-max (no "
            "underflow; ~1e-7 relative); CUDA graphs, channels_last and the device data path "
            "are CUDA-only; operators MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1; "
            "PyTorch names each one in a warning)"]


def resolve_graph(cfg: Config, device: torch.device) -> bool:
    if cfg.graph == "on" and device.type != "cuda":
        raise ConfigError("graph", f"on needs a CUDA device, and this run uses {device.type}; "
                                   "allowed here: auto, off")
    return cfg.graph == "on" or (cfg.graph == "auto" and device.type == "cuda")


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """Yield an autocast factory for the forward pass; restore global flags afterwards.

    ``default`` leaves PyTorch alone, which on Ampere and newer runs fp32 convolutions as
    TF32, as the notebook ran. ``fp32`` turns TF32 off (strict IEEE; ~2.5x slower on an
    H200: docs, internals/fast-path.md). ``bf16`` autocasts; norms are still reduced in
    float64. cudnn.benchmark stays off: on an H200 it bought nothing here (5.73 against
    5.74 ms per step) and would make the algorithm choice, hence the last bits of every
    norm, vary from run to run.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield engine.autocast_for(precision, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def environment(device: torch.device) -> dict[str, str]:
    """Versions and numeric settings that can change results, as ``env.*`` tags (read inside
    ``precision_mode``, whose flags they report)."""
    import mlflow
    import torchvision

    cuda = device.type == "cuda"
    return {
        "env.torch": torch.__version__, "env.torchvision": torchvision.__version__,
        "env.mlflow": mlflow.__version__, "env.cuda": str(torch.version.cuda),
        "env.cudnn": str(torch.backends.cudnn.version()),
        "env.gpu": torch.cuda.get_device_name(device) if cuda else "none",
        "env.cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32).lower(),
        "env.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32).lower(),
        "env.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env.cpu_threads": str(torch.get_num_threads()),
    }
