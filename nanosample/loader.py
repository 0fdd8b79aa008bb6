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
"""

import contextlib
import difflib
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from nanosample.cpu_kernels import use_cpu_kernels
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


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read; the message is one line saying what to do."""


@dataclass
class Loaded:
    model: GPT
    tokenizer: object          # GPT2Tokenizer | CharTokenizer
    source: str                # what was loaded, for messages
    info: dict = field(default_factory=dict)  # e.g. the native format's "training" entry


# ----------------------------------------------------------------------------- entry point

def load_model(init_from, *, out_dir="out", device="cpu", dtype=torch.float32):
    """Load the model and tokenizer `init_from` names, in eval mode, on `device` in `dtype`."""
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
    use_cpu_kernels(loaded.model)  # CPU fp32 inference: oneDNN's batch-invariant products
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
    path = Path(init_from).expanduser()
    if path.exists():
        return path
    shipped = PROJECT_CHECKPOINTS / init_from
    if os.sep not in init_from and shipped.is_dir():
        return shipped
    shipped_names = sorted(p.name for p in PROJECT_CHECKPOINTS.glob("*") if p.is_dir())
    known = list(HF_MODEL_NAMES) + ["resume"] + shipped_names
    close = difflib.get_close_matches(init_from, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CheckpointError(
        f"init_from={init_from!r}: no such file or directory, and not a known model; {hint}"
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


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged") from None
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
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: re-tie
    assert not any(p.is_meta for p in model.parameters()), "a parameter was not loaded"
    return model


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


def _config_from_dict(values, source, **overrides):
    """GPTConfig from a dict of its fields; unknown or bad values are a CheckpointError."""
    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown model config field {unknown[0]!r}; "
                              f"known: {', '.join(sorted(names))}")
    try:
        config = GPTConfig(**{**values, **overrides})
    except (AssertionError, TypeError) as e:
        raise CheckpointError(f"{source}: invalid model config {values}: {e}") from None
    for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        v = getattr(config, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{source}: model config {f}={v!r}: must be a positive integer")
    return config


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
    if version != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {version!r} is not "
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
        config = huggingface_hub.hf_hub_download(repo_id=repo, filename="config.json")
        weights = huggingface_hub.hf_hub_download(repo_id=repo, filename="model.safetensors")
    except Exception as e:  # offline, DNS, HTTP errors, a full disk: all end the same way
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            reason = "HF_HUB_OFFLINE is set and the files are not in the local cache"
        else:
            reason = f"{type(e).__name__}: {_first_sentence(e)}"
        raise CheckpointError(
            f"{name}: could not download {repo} from the Hugging Face hub ({reason}); to use "
            f"a local copy, pass its directory (holding config.json and model.safetensors) "
            f"as init_from") from None
    directory = Path(config).parent
    assert Path(weights).parent == directory, "hf_hub_download put the files in one snapshot"
    return directory


def _first_sentence(exc, limit=160):
    """The first line or sentence of an exception's message, for a one-line error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hf_gpt_config(hf, source):
    """GPTConfig for a Hugging Face GPT-2 config.json; refuses options model.py lacks."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_GELU:
        raise CheckpointError(f"{source}: activation_function {activation!r} is not supported "
                              f"(only {', '.join(HF_GELU)})")
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
            raise CheckpointError(f"{source}: {key}={hf.get(key)!r} is not supported by this "
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
    return _config_from_dict(values, source)


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
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        raw = {}
        for shard in shards:
            raw.update(_read_safetensors(directory / shard))
    elif (directory / "pytorch_model.bin").is_file():
        weights = directory / "pytorch_model.bin"
        raw = _torch_load(weights)
    else:
        raise CheckpointError(f"{directory}: config.json is here but no weights; expected "
                              f"model.safetensors or pytorch_model.bin beside it")
    if not isinstance(raw, dict) or not all(isinstance(v, (torch.Tensor, _SafetensorsTensor))
                                            for v in raw.values()):
        raise CheckpointError(f"{weights}: not a state dict of tensors")
    model = _build_model(config, _hf_state_dict(raw), device, dtype, weights)
    return Loaded(model, _gpt2_tokenizer(config, weights), f"{directory} (Hugging Face GPT-2)")


def _gpt2_tokenizer(config, source):
    try:
        tokenizer = gpt2_tokenizer()
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    _check_vocab_fits(tokenizer, config, source)
    return tokenizer


def _torch_load(path):
    """torch.load restricted to tensors and plain containers (no pickled code runs)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except pickle.UnpicklingError as e:
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: refused, it holds more than tensors and plain values "
                              f"({reason})") from None
    except Exception as e:
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: cannot read this PyTorch file ({reason}); it is "
                              f"truncated, corrupted or not a checkpoint") from None


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
    """

    ALLOWED = {"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool",
               "bytes", "bytearray"}

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: meta.pkl may only hold "
                                     f"plain values (dict, list, str, int)")


def read_meta_pkl(path):
    """nanoGPT's meta.pkl, without running any pickled code."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except Exception as e:  # UnpicklingError, EOFError, ...: refused or damaged
        reason = _first_sentence(e, 200)
        raise CheckpointError(f"{path}: not a plain nanoGPT vocabulary ({reason})") from None
