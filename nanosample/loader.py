"""Checkpoint loading: every file format and every quirk, behind one entry point.

    load_model(init_from, out_dir=..., device=..., dtype=...) -> Loaded(model, tokenizer, source)
    save_native(model, tokenizer, directory, extra)

`init_from` is what a user types:
- "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": config.json + model.safetensors from
  openai-community/<name> on the Hugging Face hub (huggingface_hub's cache and progress bar);
- "resume": nanoGPT's ckpt.pt in `out_dir`;
- a path: a directory in our native format, in Hugging Face format, or a nanoGPT out_dir
  holding ckpt.pt; or a ckpt.pt file;
- the bare name of a folder under the project's checkpoints/ (the shipped "shakespeare_char").

Quirks handled here and nowhere else:
- Hugging Face GPT-2 stores its projections as Conv1D, (in, out): transposed to nn.Linear's
  (out, in). Keys come with a "transformer." prefix (save_pretrained) or without (the hub's
  files). The attn.bias / attn.masked_bias mask buffers are dropped. activation "gelu_new" is
  the tanh GELU; "gelu" is the exact one.
- nanoGPT: `model_args`, the "_orig_mod." prefix torch.compile leaves, bias=False models, the
  vocabulary padded to 50304 (ids >= the tokenizer's n_vocab never decode), exact GELU, and a
  character vocabulary in a meta.pkl beside ckpt.pt, read by an unpickler that builds only
  plain builtins (dict, list, str, int, ...) and so never runs pickled code.
- lm_head is always tied to wte (GPT-2 ties them); a stored lm_head.weight is ignored.

Memory: the model is built on the meta device and the loaded tensors are assigned into it
(load_state_dict(assign=True)). Safetensors are memory-mapped: a tensor loaded as stored
(float32 on the CPU, not transposed) is a view of the file with no copy; one that must be
cast, moved or transposed is read through a mapping of its own that is dropped once it is
converted, so loading never holds two copies of the weights (bench_load.py measures it).
transformers is never imported here (it is a test dependency only).

Every failure a user can cause is a CheckpointError whose message is one line naming the file
or model name and what to do.

Nothing read from a file is trusted, and each failure comes before its cost: every config value
is checked (types, ranges, n_embd a multiple of n_head, the size limits below and the parameter
count they imply, then that count against the device's memory) before a model is built; JSON
and meta.pkl are read only from regular files of bounded size; a torch.save zip is checked for
compressed records (a zip bomb) before torch reads it, then memory-mapped; meta.pkl's unpickler
builds plain values only and never from a size argument; every weight must be a dense float
tensor, and finite once cast (NaN weights are refused here, not met as NaN logits mid-run).
"""

import contextlib
import difflib
import io
import json
import os
import pickle
import reprlib
import stat
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from nanosample.cpu_kernels import use_cpu_kernels
from nanosample.quantize import quantize as quantize_model
from nanosample.model import GPT, GPTConfig
from nanosample.tokenizer import CharTokenizer, TokenizerError, gpt2_tokenizer, tokenizer_from_config

HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_REPO_OWNER = "openai-community"
PROJECT_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
NATIVE_FORMAT = "nanosample"
NATIVE_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Hugging Face's Conv1D layers, whose weights are stored (in, out)
HF_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                      "mlp.c_proj.weight")
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
           "gelu": "exact"}

# What a checkpoint may declare. Far above every GPT-2-family model (GPT-2 XL: 48 layers,
# n_embd 1600, 50257 tokens, 1024 positions, 1.56 B parameters), and checked before anything
# is allocated, so an absurd config.json fails at once instead of exhausting the machine.
MAX_LAYERS = 1000
MAX_EMBD = 65536            # also bounds n_head (n_embd must be a multiple of it)
MAX_VOCAB = 2**20
MAX_BLOCK_SIZE = 2**20
MAX_PARAMETERS = 2**34      # ~17 B, 11x GPT-2 XL
# The files read whole into memory: only regular files, and at most this many bytes.
MAX_JSON_BYTES = 32 * 2**20     # config.json (a native one lists its characters), the index
MAX_META_PKL_BYTES = 32 * 2**20
MAX_DATA_PKL_BYTES = 64 * 2**20  # the pickle inside a torch.save zip (the tensors are beside it)
MAX_SHARDS = 1024


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read; the message is one line saying what to do."""


@dataclass
class Loaded:
    model: GPT
    tokenizer: object          # GPT2Tokenizer | CharTokenizer
    source: str                # what was loaded, for messages
    info: dict = field(default_factory=dict)  # e.g. the native format's "training" entry


# ----------------------------------------------------------------------------- entry point

def load_model(init_from, *, out_dir="out", device="cpu", dtype=torch.float32, quantize="none"):
    """Load the model and tokenizer `init_from` names, in eval mode, on `device` in `dtype`.

    `quantize` ("none", "fp16", "bf16", "int8"; a float32 model on the CPU only): the matrix
    products' weights in fewer bits (quantize.py). The parameter count is kept in
    `info["parameters"]`, since the packed weights are no longer parameters.
    """
    dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    init_from = str(init_from)
    if init_from in HF_MODEL_NAMES:
        directory = _download_hf(init_from)
        loaded = _load_hf_dir(directory, device, dtype)
        loaded.source = f"{init_from} ({HF_REPO_OWNER}/{init_from} from the Hugging Face hub)"
    elif init_from == "resume":
        ckpt = Path(out_dir) / "ckpt.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{ckpt}: not found; init_from='resume' loads nanoGPT's ckpt.pt "
                                  f"from out_dir (set out_dir to the folder holding it)")
        loaded = _load_nanogpt(ckpt, device, dtype)
    else:
        loaded = _load_path(_resolve_path(init_from), device, dtype)
    loaded.model.eval()
    loaded.info["parameters"] = loaded.model.num_params()
    if quantize == "none":
        use_cpu_kernels(loaded.model)  # CPU fp32 inference: oneDNN's batch-invariant products
    else:
        quantize_model(loaded.model, quantize)
        loaded.info["quantize"] = quantize
    return loaded


def _resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype}: must be one of {', '.join(DTYPES)}")


def _resolve_device(device):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device}: must be cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available in this PyTorch build or machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device}: MPS is not available on this machine")
    return device


def _resolve_path(init_from):
    try:
        path = Path(init_from).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist
        raise CheckpointError(f"init_from={_short(init_from)}: cannot expand '~' (no such user "
                              f"or home directory); give the full path") from None
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, a folder we may not read
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise CheckpointError(f"init_from={_short(init_from)}: not a usable path "
                              f"({reason})") from None
    if exists:
        return path
    shipped = PROJECT_CHECKPOINTS / init_from
    if os.sep not in init_from and shipped.is_dir():
        return shipped
    shipped_names = sorted(p.name for p in PROJECT_CHECKPOINTS.glob("*") if p.is_dir())
    known = list(HF_MODEL_NAMES) + ["resume"] + shipped_names
    close = difflib.get_close_matches(init_from, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CheckpointError(
        f"init_from={_short(init_from)}: no such file or directory, and not a known model; {hint}"
        f"use one of {', '.join(known)}, or a path to a checkpoint directory or ckpt.pt")


def _load_path(path, device, dtype):
    if path.is_file():
        if path.name in ("config.json", "model.safetensors", "pytorch_model.bin"):
            return _load_path(path.parent, device, dtype)
        return _load_nanogpt(path, device, dtype)
    config_path = path / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if config.get("format") == NATIVE_FORMAT:
            return _load_native(path, config, device, dtype)
        return _load_hf_dir(path, device, dtype, config)
    if (path / "ckpt.pt").is_file():
        return _load_nanogpt(path / "ckpt.pt", device, dtype)
    raise CheckpointError(
        f"{path}: no checkpoint found; expected config.json with model.safetensors "
        f"(our format or Hugging Face's) or pytorch_model.bin, or nanoGPT's ckpt.pt")


def _read_bounded(path, limit):
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Opened without blocking and checked before reading: a FIFO would wait for a writer forever
    and a device (/dev/zero) would never end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); "
                                  f"a checkpoint's files must be ordinary files")
        if info.st_size > limit:
            raise CheckpointError(f"{path}: {info.st_size} bytes, over the {_mib(limit)} limit "
                                  f"for this file; it is not a GPT-2 checkpoint's")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    if len(data) > limit:  # it grew while we read it
        raise CheckpointError(f"{path}: over the {_mib(limit)} limit for this file")
    return data


def _mib(n):
    return f"{n / 2**20:g} MiB"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlevel = 2


def _short(value):
    """repr(value), shortened, for echoing a value read from a file in a one-line message."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a huge int is slow or fails
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except Exception:  # a huge int inside a list, ...
        return f"<a {type(value).__name__}>"


def _read_json(path):
    data = _read_bounded(path, MAX_JSON_BYTES)
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, an int over 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({_first_sentence(e)}); the file is "
                              f"damaged") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a config: its JSON is nested too deeply") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- the model

def _build_model(config, state_dict, device, dtype, source):
    """GPT(config) holding the tensors of `state_dict` (model.py's names, lm_head omitted).

    The values are tensors or _SafetensorsTensor entries read on demand. The model is built on
    the meta device, so no memory is spent on an initialisation the checkpoint overwrites;
    each tensor is read, cast and moved once, then assigned.
    """
    _check_fits_in_memory(config, device, dtype, source)
    with torch.device("meta"), _init_skipped():
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _check_weights_match(state_dict, expected, source)
    tensors = {}
    for name in expected:
        t = state_dict.pop(name)  # pop: let the source tensor go as soon as it is converted
        if isinstance(t, _SafetensorsTensor):
            t = t.read(device, dtype)
        # a copy only where dtype, device or layout differ: fp32 on the CPU stays memory-mapped
        tensors[name] = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
        _check_finite(tensors[name], name, dtype, source)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: re-tie
    assert not any(p.is_meta for p in model.parameters()), "a parameter was not loaded"
    return model


def _check_finite(t, name, dtype, source):
    """Refuse NaN or infinite weights at load, not as NaN logits in the middle of a run.

    aminmax reads the tensor once and allocates nothing; NaN propagates into both results.
    """
    lo, hi = torch.aminmax(t)
    if not (torch.isfinite(lo) and torch.isfinite(hi)).item():
        hint = ("; the checkpoint is damaged (a diverged training run?)" if dtype != torch.float16
                else " in float16, whose largest value is 65504: load it in float32 or bfloat16")
        raise CheckpointError(f"{source}: {name} holds NaN or infinite values{hint}")


def _device_memory(device):
    """Bytes of memory on `device`, or None where it cannot be told."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def _check_fits_in_memory(config, device, dtype, source):
    """Refuse, before anything is allocated, a model larger than the device's whole memory."""
    need = parameter_count(config) * dtype.itemsize
    have = _device_memory(device)
    if have is not None and need > have:
        raise CheckpointError(f"{source}: the model needs {need / 1e9:.3g} GB in "
                              f"{str(dtype).removeprefix('torch.')} but {device.type} has "
                              f"{have / 1e9:.3g} GB in all")


@contextlib.contextmanager
def _init_skipped():
    """nn.init's functions as no-ops while a model whose weights will be assigned is built.

    Initialising is wasted work on the meta device, and not free: the first normal_ on a meta
    tensor imports ~800 modules of torch's Python reference kernels, about 1.5 s of start-up.
    (Hugging Face's no_init_weights does the same.)
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _check_weights_match(state_dict, expected, source):
    for k, t in state_dict.items():
        if not isinstance(t, (torch.Tensor, _SafetensorsTensor)):
            name = k if isinstance(k, str) and len(k) <= 80 else _short(k)
            raise CheckpointError(f"{source}: {name} is a {type(t).__name__}, not a tensor")
        if isinstance(t, torch.Tensor) and k in expected:
            if t.layout != torch.strided:
                raise CheckpointError(f"{source}: {k} is a {t.layout} tensor; only dense tensors "
                                      f"can be loaded")
            if t.is_meta or t.is_quantized:
                raise CheckpointError(f"{source}: {k} is a {'meta' if t.is_meta else 'quantized'} "
                                      f"tensor{' and holds no values' if t.is_meta else ''}; "
                                      f"only dense float tensors can be loaded")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]

    def some(keys):
        return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    what = None
    if wrong:
        k = wrong[0]
        what = (f"{k} has shape {tuple(state_dict[k].shape)} but the config needs "
                f"{tuple(expected[k])}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    elif missing:
        what = f"missing {some(missing)}"
    elif unexpected:
        what = f"unexpected {some(unexpected)}"
    if what:
        raise CheckpointError(f"{source}: the weights do not match the model config: {what}")
    for k in expected:
        if not state_dict[k].is_floating_point():
            raise CheckpointError(f"{source}: {k} holds {state_dict[k].dtype}, not floats")


SIZE_LIMITS = {"block_size": MAX_BLOCK_SIZE, "vocab_size": MAX_VOCAB, "n_layer": MAX_LAYERS,
               "n_head": MAX_EMBD, "n_embd": MAX_EMBD}


def _size_rule(limit):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit,
            f"a positive integer, at most {limit} (no GPT-2-family model is larger)")


# field -> (whether a value is allowed, what the message says it must be), checked in this order
CONFIG_RULES = {
    **{f: _size_rule(limit) for f, limit in SIZE_LIMITS.items()},
    # 0 < eps < 1 also refuses NaN and inf, and compares a huge int without converting it
    "layer_norm_epsilon": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and 0 < v < 1, "a number between 0 and 1 (GPT-2's is 1e-5)"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    # a tuple compares with ==: an unhashable value is just unequal
    "gelu": (lambda v: v in ("tanh", "exact"), "'tanh' or 'exact'"),
}


def _config_from_dict(values, source, file_names=None, **overrides):
    """GPTConfig from a dict of its fields; unknown or bad values are a CheckpointError.

    Every value is checked here (CONFIG_RULES), before any model is built: types, ranges,
    n_embd a multiple of n_head, and the parameter count the sizes imply, so an absurd config
    fails at once. Messages name a field as the file does: `file_names` maps ours to the
    file's (block_size is Hugging Face's n_positions).
    """
    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown model config field {_short(unknown[0])}; "
                              f"known: {', '.join(sorted(names))}")
    values = {**asdict(GPTConfig()), **values, **overrides}
    for f, (allowed, what) in CONFIG_RULES.items():
        if not allowed(values[f]):
            raise CheckpointError(f"{source}: model config {(file_names or {}).get(f, f)}="
                                  f"{_short(values[f])}: must be {what}")
    if values["n_embd"] % values["n_head"]:
        raise CheckpointError(f"{source}: model config n_embd={values['n_embd']} is not a multiple "
                              f"of n_head={values['n_head']}")
    config = GPTConfig(**values)
    n = parameter_count(config)
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{source}: the model config describes {n / 1e9:.3g} billion "
                              f"parameters, over the limit of {MAX_PARAMETERS / 1e9:.3g} billion "
                              f"(GPT-2 XL has 1.56)")
    return config


def parameter_count(config):
    """The number of parameters GPT(config) holds (lm_head is wte), from the sizes alone."""
    C = config.n_embd
    norm = 2 * C if config.bias else C                   # a LayerNorm: weight (+ bias)
    biases = 9 * C if config.bias else 0                 # c_attn 3C, c_proj C, c_fc 4C, c_proj C
    block = 12 * C * C + biases + 2 * norm               # c_attn 3C², c_proj C², MLP 8C²
    return (config.vocab_size + config.block_size) * C + config.n_layer * block + norm


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}


class _SafetensorsTensor:
    """One tensor of a safetensors file, memory-mapped when `read()` asks for it.

    A tensor that loads as it is stored (same dtype, on the CPU, not transposed) is a view of
    the file's one shared mapping: no copy at all, pages are read on first use. A tensor that
    must be converted is read through a mapping of its own, dropped as soon as the converted
    copy exists. (Through the shared mapping, every page converted so far would stay resident
    until loading ends: two copies of the weights at the peak.)
    Offers what the key mapping and the checks need: shape, dim(), t() (a transpose applied
    on read), is_floating_point().
    """

    def __init__(self, path, key, shape, dtype, shared, transposed=False):
        self.path, self.key, self.dtype, self.transposed = path, key, dtype, transposed
        self.shape = torch.Size(shape)
        self._shared = shared  # the file's safe_open handle, shared by its tensors

    def dim(self):
        return len(self.shape)

    def t(self):
        assert self.dim() == 2
        return _SafetensorsTensor(self.path, self.key, self.shape[::-1], self.dtype,
                                  self._shared, not self.transposed)

    def is_floating_point(self):
        return self.dtype in SAFETENSORS_DTYPES

    def read(self, device, dtype):
        """The tensor converted to `device` and `dtype`, contiguous."""
        from safetensors import safe_open

        as_stored = (not self.transposed and SAFETENSORS_DTYPES.get(self.dtype) == dtype
                     and torch.device(device).type == "cpu")
        try:
            if as_stored:
                return self._shared.get_tensor(self.key)
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                t = f.get_tensor(self.key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.key} "
                                  f"({_first_sentence(e)}); the file is damaged") from None
        if self.transposed:
            t = t.t()  # (out, in) view of the stored (in, out)
        return t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _read_safetensors(path):
    """{name: _SafetensorsTensor} of a safetensors file; only the header is read here."""
    from safetensors import safe_open

    _check_regular_file(path)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        entries = {}
        for k in f.keys():
            info = f.get_slice(k)
            entries[k] = _SafetensorsTensor(path, k, info.get_shape(), info.get_dtype(), f)
        return entries
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except Exception as e:  # SafetensorError, OSError: a short or garbled file
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); it is "
                              f"truncated or corrupted, download or save it again") from None


def _check_regular_file(path):
    """A weights file is read in place (memory-mapped): it must be an ordinary file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise CheckpointError(f"{path}: cannot read it ({reason})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a folder, FIFO or device)")


def _write_atomically(path, write):
    """Write via a temporary file and rename, so a reader (or a model memory-mapping the old
    file) never sees a half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- native format

def save_native(model, tokenizer, directory, extra=None):
    """Write `model` and `tokenizer` to `directory` in the native format.

    directory/model.safetensors: the state dict with model.py's names, lm_head.weight omitted
    (it is wte); directory/config.json: {"format": "nanosample", "format_version": 1,
    "model": {GPTConfig fields}, "tokenizer": tokenizer.config(), "training": extra or {}}.
    `extra` is free-form JSON (the training recipe and its results).
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_FORMAT_VERSION,
        "model": asdict(model.config),
        "tokenizer": tokenizer.config(),
        "training": extra or {},
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"  # fails before any write
    _write_atomically(directory / "model.safetensors",
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomically(directory / "config.json",
                      lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _load_native(directory, config, device, dtype):
    config_path = directory / "config.json"
    version = config.get("format_version")
    if type(version) is not int or version != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {_short(version)} is not "
                              f"{NATIVE_FORMAT_VERSION}; it was written by another nanosample version")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path}: no 'model' entry with the GPTConfig fields")
    gpt_config = _config_from_dict(config["model"], config_path)
    try:
        tokenizer = tokenizer_from_config(config.get("tokenizer"), config_path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    _check_vocab_fits(tokenizer, gpt_config, config_path)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found; {config_path} needs its weights beside it")
    state_dict = _read_safetensors(weights)
    model = _build_model(gpt_config, state_dict, device, dtype, weights)
    return Loaded(model, tokenizer, f"{directory} (nanosample checkpoint)",
                  {"training": config.get("training", {})})


def _check_vocab_fits(tokenizer, config, source):
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(f"{source}: the {tokenizer.name} tokenizer has {tokenizer.n_vocab} "
                              f"tokens but the model only {config.vocab_size}")


# ----------------------------------------------------------------------------- Hugging Face

def _download_hf(name):
    """Directory holding config.json and model.safetensors of openai-community/<name>."""
    import huggingface_hub

    repo = f"{HF_REPO_OWNER}/{name}"
    try:
        # config.json first, quietly: offline, this is where it fails, and it must fail at once
        with _hub_quietly():
            config = huggingface_hub.hf_hub_download(repo_id=repo, filename="config.json")
        # the hub answered: the weights download as usual, with its progress bar and retries
        weights = huggingface_hub.hf_hub_download(repo_id=repo, filename="model.safetensors")
    except Exception as e:  # offline, DNS, HTTP errors, a full disk: all end the same way
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            reason = "HF_HUB_OFFLINE is set and the files are not in the local cache"
        else:
            while e.__cause__ or e.__context__:  # the network error under the hub's own
                e = e.__cause__ or e.__context__
            reason = f"{type(e).__name__}: {_first_sentence(e, 100)}"
        raise CheckpointError(
            f"{name}: could not download {repo} from the Hugging Face hub ({reason}); to use "
            f"a local copy, download it where there is a network and pass its directory "
            f"(config.json and model.safetensors) as init_from, or set HF_HUB_OFFLINE=1 if it "
            f"is in the Hugging Face cache") from None
    directory = Path(config).parent
    assert Path(weights).parent == directory, "hf_hub_download put the files in one snapshot"
    return directory


@contextlib.contextmanager
def _hub_quietly():
    """huggingface_hub without its warnings, retries and progress bars, so that a failure is our
    one error line, at once.

    When a file's first metadata request fails and the file is not cached, hf_hub_download
    requests it again with up to five retries and a growing wait, logging a warning for each:
    offline, ~30 s and a dozen lines before our error. No argument turns the retries off; the
    module checks the error against two tuples, emptied here while we call it (where this
    version has them; elsewhere the logging is silenced all the same).
    """
    from huggingface_hub import file_download, utils

    retry_names = [n for n in ("_DEFAULT_RETRY_ON_EXCEPTIONS", "_DEFAULT_RETRY_ON_STATUS_CODES")
                   if isinstance(getattr(file_download, n, None), tuple)]
    saved = {n: getattr(file_download, n) for n in retry_names}
    verbosity = utils.logging.get_verbosity()
    bars_were_off = utils.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "cannot disable progress bars" when the env forbids
        try:
            for n in retry_names:
                setattr(file_download, n, ())
            utils.logging.set_verbosity_error()
            utils.disable_progress_bars()
            yield
        finally:
            for n, v in saved.items():
                setattr(file_download, n, v)
            utils.logging.set_verbosity(verbosity)
            if not bars_were_off:
                utils.enable_progress_bars()


def _first_sentence(exc, limit=160):
    """The first line or sentence of an exception's message, for a one-line error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hf_gpt_config(hf, source):
    """GPTConfig for a Hugging Face GPT-2 config.json; refuses options model.py lacks."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {_short(hf.get('model_type'))} is not GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in HF_GELU:
        raise CheckpointError(f"{source}: activation_function {_short(activation)} is not "
                              f"supported (only {', '.join(HF_GELU)})")
    n_embd = hf.get("n_embd", 768)
    unsupported = [
        ("n_inner", hf.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None)),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is not True),
        ("scale_attn_by_inverse_layer_idx", bool(hf.get("scale_attn_by_inverse_layer_idx"))),
        ("add_cross_attention", bool(hf.get("add_cross_attention"))),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True) is not True),
    ]
    for key, bad in unsupported:
        if bad:
            raise CheckpointError(f"{source}: {key}={_short(hf.get(key))} is not supported by this "
                                  f"GPT-2 implementation")
    values = dict(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        bias=True,
        gelu=HF_GELU[activation],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    return _config_from_dict(values, source, file_names={"block_size": "n_positions"})


def _hf_state_dict(raw):
    """Hugging Face GPT-2 keys and layouts -> model.py's (lm_head and mask buffers dropped)."""
    out = {}
    for key, t in raw.items():
        parts = key.split(".")
        if parts[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # the causal-mask buffers, not weights (c_attn.bias is kept)
        if key.startswith("lm_head."):
            continue  # tied to wte
        name = key if key.startswith("transformer.") else "transformer." + key
        if name.endswith(HF_CONV1D_SUFFIXES) and t.dim() == 2:
            t = t.t()  # HF stores Conv1D as (in, out); nn.Linear wants (out, in)
        out[name] = t
    return out


def _load_hf_dir(directory, device, dtype, hf_config=None):
    config_path = directory / "config.json"
    hf_config = _read_json(config_path) if hf_config is None else hf_config
    config = _hf_gpt_config(hf_config, config_path)
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        weights = directory / "model.safetensors"
        raw = _read_safetensors(weights)
    elif index.is_file():  # sharded: the index maps each tensor to its shard
        weights = index
        shards = _shard_names(index)
        raw = {}
        for shard in shards:
            raw.update(_read_safetensors(directory / shard))
    elif (directory / "pytorch_model.bin").is_file():
        weights = directory / "pytorch_model.bin"
        raw = _torch_load(weights)
    else:
        raise CheckpointError(f"{directory}: config.json is here but no weights; expected "
                              f"model.safetensors or pytorch_model.bin beside it")
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, (torch.Tensor, _SafetensorsTensor))
            for k, v in raw.items()):
        raise CheckpointError(f"{weights}: not a state dict of tensors")
    model = _build_model(config, _hf_state_dict(raw), device, dtype, weights)
    return Loaded(model, _gpt2_tokenizer(config, weights), f"{directory} (Hugging Face GPT-2)")


def _shard_names(index):
    """The shard files a model.safetensors.index.json names: plain file names beside it."""
    weight_map = _read_json(index).get("weight_map")
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index}: 'weight_map' must map each tensor name to the file name "
                              f"of its shard")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # a shard sits beside the index: no folders, so none can name a file outside the model
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise CheckpointError(f"{index}: weight_map names the shard {_short(shard)}; a shard "
                                  f"must be a file name in the model's directory")
    if len(shards) > MAX_SHARDS:
        raise CheckpointError(f"{index}: weight_map names {len(shards)} shards, over the limit "
                              f"of {MAX_SHARDS}")
    return shards


def _gpt2_tokenizer(config, source):
    try:
        tokenizer = gpt2_tokenizer()
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    _check_vocab_fits(tokenizer, config, source)
    return tokenizer


def _torch_load(path):
    """torch.load restricted to tensors and plain containers (no pickled code runs).

    A zip (every torch.save since PyTorch 1.6) is checked first and then memory-mapped, so the
    tensors are views of the file and nothing is inflated; the legacy format cannot be mapped
    and is read, after torch's own check that each storage is as long as it says.
    torch's warnings (e.g. about a pickle protocol it did not write) are silenced: what goes
    wrong is the one-line CheckpointError.
    """
    _check_regular_file(path)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.load's own test for its zip format
        if is_zip:
            _check_torch_zip(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e):  # FRAME (protocol 4) and others weights_only lacks
            raise CheckpointError(f"{path}: written with a pickle protocol (4 or 5) that "
                                  f"torch.load(weights_only=True) cannot read; save it again with "
                                  f"torch.save's default protocol") from None
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: refused, it holds more than tensors and plain values "
                              f"({reason})") from None
    except Exception as e:
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: cannot read this PyTorch file ({reason}); it is "
                              f"truncated, corrupted or not a checkpoint") from None


def _check_torch_zip(path):
    """Refuse a torch.save zip that loading would inflate (a zip bomb) before torch reads it.

    torch.save stores every record uncompressed, so its records together are never larger than
    the file; a compressed record, or a pickle over the limit, is not from torch.save.
    """
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read this PyTorch file ({_first_sentence(e)}); "
                              f"it is truncated, corrupted or not a checkpoint") from None
    size = os.path.getsize(path)
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED or r.file_size > size:
            raise CheckpointError(f"{path}: refused, its record {_short(r.filename)} is "
                                  f"compressed or larger than the file; torch.save never writes "
                                  f"such a file")
        if r.filename.endswith("data.pkl") and r.file_size > MAX_DATA_PKL_BYTES:
            raise CheckpointError(f"{path}: refused, its pickle is {r.file_size} bytes, over the "
                                  f"{_mib(MAX_DATA_PKL_BYTES)} limit")


# ----------------------------------------------------------------------------- nanoGPT

NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def _load_nanogpt(path, device, dtype):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' "
                              f"and 'model_args')")
    args = ckpt["model_args"]
    if not isinstance(args, dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' and 'model_args' must be dicts, as nanoGPT saves them")
    missing = [k for k in NANOGPT_MODEL_ARGS if k not in args]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}")
    # nanoGPT's MLP is nn.GELU() (exact); dropout only matters in training
    values = {k: args[k] for k in NANOGPT_MODEL_ARGS}
    config = _config_from_dict(values, path, gelu="exact")
    prefix = "_orig_mod."  # left by torch.compile on every key
    state_dict = {}
    bad = next((k for k in ckpt["model"] if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: 'model' has the key {_short(bad)}; a state dict's keys "
                              f"are parameter names")
    for key, t in ckpt["model"].items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if key.endswith(".attn.bias") or key == "lm_head.weight":
            continue  # the causal-mask buffer (nanoGPT without flash attention), tied head
        state_dict[key] = t
    info = {k: _plain(ckpt[k]) for k in ("iter_num", "best_val_loss", "config") if k in ckpt}
    del ckpt
    meta_path = _find_meta_pkl(path, info.get("config"))
    if meta_path is not None:
        info["meta_pkl"] = str(meta_path)
        try:
            tokenizer = CharTokenizer.from_meta(read_meta_pkl(meta_path), meta_path)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
        _check_vocab_fits(tokenizer, config, path)
    else:
        if config.vocab_size < 50257:
            raise CheckpointError(f"{path}: vocab_size={config.vocab_size} is not GPT-2's; put the "
                                  f"meta.pkl of its dataset (nanoGPT's data/<dataset>/meta.pkl) "
                                  f"beside it")
        tokenizer = _gpt2_tokenizer(config, path)
    model = _build_model(config, state_dict, device, dtype, path)
    return Loaded(model, tokenizer, f"{path} (nanoGPT checkpoint)", info)


def _find_meta_pkl(ckpt_path, train_config):
    """The character vocabulary of a nanoGPT checkpoint: meta.pkl beside ckpt.pt (its out_dir),
    else where nanoGPT's sample.py looks, data/<dataset>/meta.pkl, from the nanoGPT checkout
    holding the out_dir or from the working directory."""
    candidates = [ckpt_path.parent / "meta.pkl"]
    dataset = train_config.get("dataset") if isinstance(train_config, dict) else None
    if isinstance(dataset, str) and dataset and "/" not in dataset and dataset not in (".", ".."):
        candidates += [ckpt_path.parent.parent / "data" / dataset / "meta.pkl",
                       Path("data") / dataset / "meta.pkl"]
    return next((p for p in candidates if p.is_file()), None)


def _plain(value):
    """nanoGPT saves best_val_loss as a 0-d tensor: report it as a number."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


class _PlainUnpickler(pickle.Unpickler):
    """Builds only plain builtin values; any other class or function is refused.

    dict, list, tuple, str, int, float, bool and None have their own pickle opcodes and never
    reach find_class; the names allowed here are the few plain types older protocols name.
    Each is called through `_construct`, which refuses a size argument (`bytearray(2000000000)`
    would allocate 2 GB from a 30-byte file) and counts the items the calls copy against a
    budget: opcodes alone build at most a few objects per byte of the file, so a bounded file
    and a bounded budget bound the memory unpickling takes.
    """

    ALLOWED = {"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool",
               "bytes", "bytearray"}
    BUDGET = 2**22  # items that the allowed calls may copy, in all

    def __init__(self, file):
        super().__init__(file)
        self._budget = self.BUDGET

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in self.ALLOWED:
            cls = super().find_class(module, name)
            return lambda *args: self._construct(cls, args)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: meta.pkl may only hold "
                                     f"plain values (dict, list, str, int)")

    def _construct(self, cls, args):
        text_like = (str, bytes, bytearray)
        if cls in (str, int, float, bytes, bytearray):
            # from text or bytes only (and an encoding): never a size, never a container
            ok = all(isinstance(a, text_like) for a in args) or (
                cls in (int, float) and len(args) == 1 and isinstance(args[0], (int, float)))
        else:  # bool, or a container copied from another
            ok = len(args) <= 1
        if not ok:
            raise pickle.UnpicklingError(f"refused {cls.__name__}{_short(args)}: meta.pkl may "
                                         f"only hold plain values")
        self._budget -= sum(len(a) if hasattr(a, "__len__") else 1 for a in args)
        if self._budget < 0:
            raise pickle.UnpicklingError(f"its values copy more than {self.BUDGET} items")
        return cls(*args)


def read_meta_pkl(path):
    """nanoGPT's meta.pkl, without running any pickled code, in bounded memory."""
    data = _read_bounded(path, MAX_META_PKL_BYTES)
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # UnpicklingError, EOFError, MemoryError, ...: refused or damaged
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: not a plain nanoGPT vocabulary ({reason})") from None
