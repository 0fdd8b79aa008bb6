"""--device and --dtype: "auto" resolved to what this machine has, or a SettingsError."""

from nanosample.settings import SettingsError


def resolve_device(device, dtype):
    """--device and --dtype ("auto" included) as what the machine can do, or an error."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"--device={device}: CUDA is not available on this machine; "
                                f"use --device=cpu or --device=auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SettingsError(f"--device={device}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("--device=mps: MPS is not available on this machine; use --device=cpu "
                            "or --device=auto")
    if dtype == "auto":
        on_gpu = device.startswith("cuda")
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype
