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


def check_quantize(quantize, device, dtype, source="--quantize"):
    """--quantize against the resolved --device and --dtype: the reduced-precision products
    are CPU kernels that take a float32 model. A SettingsError says what to do instead, naming
    `source`: the flag, or the config file that set it."""
    if quantize == "none":
        return
    from nanosample.quantize import check_available
    from nanosample.settings import name_the_source

    where = name_the_source(f"quantize={quantize}", {"quantize": source})

    if device != "cpu":
        raise SettingsError(f"{where}: the reduced-precision products run on the "
                            f"CPU only, and this run's device is {device}; on a GPU use "
                            f"--dtype=bfloat16 (or float16) instead")
    if dtype != "float32":
        raise SettingsError(f"{where}: needs --dtype=float32 (or auto), not "
                            f"{dtype}: the products' weights are made {quantize} from float32 "
                            f"and everything else stays float32")
    why_not = check_available(quantize)
    if why_not:
        raise SettingsError(f"{where}: not available here: {why_not}")
