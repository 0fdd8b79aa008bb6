"""Hostile and broken model inputs: whatever a checkpoint, model config or vocabulary file
holds, loading ends as one CheckpointError line (sample.py: one `error:` line, exit 2), at once,
in bounded memory, and runs no code from the file.

The cases are a table: each builds a tiny checkpoint of one format (our native safetensors
format, Hugging Face's, nanoGPT's ckpt.pt + meta.pkl), breaks one thing, and names what the
message must say. The bases are checked to load (test_bases_load), so every case fails for its
own reason. Cases that would allocate gigabytes or block if a check were lost (absurd sizes, a
zip bomb, a FIFO) run in a subprocess under a 2 GiB address-space limit and a timeout, as do
the end-to-end runs of sample.py. No test touches the network: the hub is a local socket that
drops every connection.
"""

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanosample import loader
from nanosample.loader import CheckpointError, load_model, save_native
from nanosample.model import GPT, GPTConfig
from nanosample.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
CHARS = list("abcdefgh\n ")
# the address space a subprocess may use: ~0.7 GB is torch itself, the bombs ask for 2-4 GB
MEMORY_LIMIT = 2 * 2**30
BOUNDED_ENV = {**{k: v for k, v in os.environ.items()
                 if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE")},
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


def tiny_gpt(vocab_size=len(CHARS), seed=0, **config):
    torch.manual_seed(seed)
    config = dict(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, **config)
    return GPT(GPTConfig(**config)).eval()


def edit_json(path, edit):
    config = json.loads(Path(path).read_text())
    edit(config)
    Path(path).write_text(json.dumps(config))  # allow_nan: NaN is written as the literal NaN


# ----------------------------------------------------------------------------- the bases

def native_dir(tmp, edit=None, tensors=None):
    """Our format: config.json {"format": "nanosample", "model": ..., "tokenizer": ...}."""
    d = tmp / "native"
    save_native(tiny_gpt(), CharTokenizer(CHARS), d)
    if edit:
        edit_json(d / "config.json", edit)
    if tensors:
        from safetensors.torch import load_file
        sd = load_file(d / "model.safetensors")
        tensors(sd)
        save_file(sd, d / "model.safetensors")
    return str(d)


HF_CONFIG = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16,
             "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


def hf_state_dict(model):
    """model.py's state dict in Hugging Face's layout: no prefix, Conv1D stored (in, out)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith(loader.HF_CONV1D_SUFFIXES):
            v = v.t()
        out[k.removeprefix("transformer.")] = v.contiguous()
    return out


def hf_dir(tmp, edit=None, tensors=None, index=None):
    """Hugging Face's layout, written without transformers (test_loader checks the real one)."""
    d = tmp / "hf"
    d.mkdir()
    sd = hf_state_dict(tiny_gpt(vocab_size=50257, gelu="tanh"))
    if tensors:
        tensors(sd)
    config = dict(HF_CONFIG)
    if edit:
        edit(config)
    (d / "config.json").write_text(json.dumps(config))
    if index is None:
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    else:  # sharded: model-00001.safetensors and the index `index(weight_map)` writes
        save_file(sd, d / "model-00001.safetensors", metadata={"format": "pt"})
        weight_map = {k: "model-00001.safetensors" for k in sd}
        (d / "model.safetensors.index.json").write_text(json.dumps(index(weight_map)))
    return str(d)


def nanogpt_dir(tmp, args=None, model=None, meta=None, protocol=2):
    """nanoGPT's out_dir: ckpt.pt {"model", "model_args", ...} and the dataset's meta.pkl.

    `meta` is the meta.pkl's bytes, or a dict to pickle."""
    d = tmp / "nanogpt"
    d.mkdir()
    gpt = tiny_gpt(bias=False, gelu="exact")
    cfg = gpt.config
    sd = {"_orig_mod." + k: v for k, v in gpt.state_dict().items()}
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                      block_size=cfg.block_size, bias=False, vocab_size=cfg.vocab_size, dropout=0.0)
    if args:
        args(model_args)
    if model:
        model(sd)
    torch.save({"model": sd, "model_args": model_args, "iter_num": 10}, d / "ckpt.pt",
               pickle_protocol=protocol)
    if meta is None:
        meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                "stoi": {c: i for i, c in enumerate(CHARS)}}
    (d / "meta.pkl").write_bytes(meta if isinstance(meta, bytes) else pickle.dumps(meta))
    return str(d)


def test_bases_load(tmp_path):
    """Every base checkpoint loads, so each broken one below fails for its own reason."""
    bases = {"native": native_dir, "hf": hf_dir, "nanogpt": nanogpt_dir,
             "hf-sharded": lambda t: hf_dir(t, index=lambda wm: {"metadata": {}, "weight_map": wm})}
    for name, make in bases.items():
        (tmp_path / name).mkdir()
        loaded = load_model(make(tmp_path / name))
        with torch.no_grad():
            assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]]))).all(), name
    # the Hugging Face layout written here is the one the loader reads: the same logits
    ref = tiny_gpt(vocab_size=50257, gelu="tanh")
    ours = load_model(str(tmp_path / "hf" / "hf")).model
    idx = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(idx), ref(idx), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the table

def setter(key, value, where=None):
    def edit(config):
        (config[where] if where else config)[key] = value
    return edit


def model_field(key, value):
    return setter(key, value, "model")


def write(name, text_or_bytes):
    """A builder that writes a file into the native base (replacing config.json, say)."""
    def build(tmp):
        d = Path(native_dir(tmp))
        data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
        (d / name).write_bytes(data)
        return str(d)
    return build


def set_weight(name, index, value):
    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name].view(-1)[index] = value
    return edit


def meta_pickle(opcodes):
    """A hand-written protocol-2 pickle (what pickle.dumps cannot be made to write)."""
    return b"\x80\x02" + opcodes + b"."


NATIVE_HEAD = '{"format": "nanosample", "format_version": 1, "tokenizer": {"kind": "char", ' \
              '"chars": ["a", "b"]}, "model": '
HUGE_INT = "1" + "0" * 4999

CASES = [
    # --- values that were tracebacks ----------------------------------------------------
    ("native-n_head-0", lambda t: native_dir(t, model_field("n_head", 0)), r"n_head=0: must be a positive integer"),
    ("hf-n_head-0", lambda t: hf_dir(t, setter("n_head", 0)), r"n_head=0: must be a positive integer"),
    ("nanogpt-n_head-0", lambda t: nanogpt_dir(t, args=setter("n_head", 0)), r"ckpt.pt: model config n_head=0"),
    ("n_embd-not-multiple-of-n_head", lambda t: native_dir(t, model_field("n_head", 3)), r"n_embd=16 is not a multiple of n_head=3"),
    ("eps-string", lambda t: native_dir(t, model_field("layer_norm_epsilon", "1e-5")), r"layer_norm_epsilon='1e-5': must be a number between 0 and 1"),
    ("eps-negative", lambda t: hf_dir(t, setter("layer_norm_epsilon", -1e-5)), r"layer_norm_epsilon=-1e-05: must be a number"),
    ("eps-nan", lambda t: native_dir(t, model_field("layer_norm_epsilon", float("nan"))), r"layer_norm_epsilon=nan: must be a number"),
    ("eps-inf", lambda t: hf_dir(t, setter("layer_norm_epsilon", float("inf"))), r"layer_norm_epsilon=inf"),
    ("eps-bool", lambda t: native_dir(t, model_field("layer_norm_epsilon", True)), r"layer_norm_epsilon=True"),
    ("n_embd-1e9-float", lambda t: native_dir(t, model_field("n_embd", 1e9)), r"n_embd=1000000000.0: must be a positive integer"),
    ("n_embd-string", lambda t: hf_dir(t, setter("n_embd", "16")), r"n_embd='16': must be a positive integer"),
    ("bias-string", lambda t: native_dir(t, model_field("bias", "yes")), r"bias='yes': must be true or false"),
    ("gelu-list", lambda t: native_dir(t, model_field("gelu", ["tanh"])), r"gelu=\['tanh'\]: must be 'tanh' or 'exact'"),
    ("activation-list", lambda t: hf_dir(t, setter("activation_function", ["gelu_new"])), r"activation_function \['gelu_new'\] is not supported"),
    ("model_type-huge-string", lambda t: hf_dir(t, setter("model_type", "x" * 100000)), r"model_type 'xxx.*' is not GPT-2"),
    ("unknown-field", lambda t: native_dir(t, model_field("n_kv_head", 2)), r"unknown model config field 'n_kv_head'"),
    ("chars-not-a-list", lambda t: native_dir(t, setter("chars", 5, "tokenizer")), r"'chars' must be a list of characters, got 5"),
    ("chars-entry-not-a-string", lambda t: native_dir(t, setter("chars", [1, "a"], "tokenizer")), r"entry 1 is not one character"),
    ("chars-lone-surrogate", lambda t: native_dir(t, setter("chars", ["a", "\ud800"], "tokenizer")), r"lone surrogate"),
    ("tokenizer-kind-list", lambda t: native_dir(t, setter("kind", ["char"], "tokenizer")), r"unknown tokenizer"),
    ("config-nested-100k-deep", write("config.json", NATIVE_HEAD + "[" * 100000 + "]" * 100000 + "}"), r"config.json: not a config: its JSON is nested too deeply"),
    ("config-5000-digit-int", write("config.json", NATIVE_HEAD + '{"n_layer": ' + HUGE_INT + "}}"), r"config.json: not valid JSON \(Exceeds the limit"),
    ("config-not-utf8", write("config.json", b'{"format": "\xff"}'), r"config.json: not valid JSON"),
    ("config-a-list", write("config.json", "[1, 2]"), r"config.json: expected a JSON object, got list"),
    ("format_version-huge", lambda t: native_dir(t, setter("format_version", 10**400)), r"format_version <an integer of \d+ bits> is not 1"),
    ("weight_map-a-list", lambda t: hf_dir(t, index=lambda wm: {"weight_map": list(wm)}), r"index.json: 'weight_map' must map each tensor name"),
    ("weight_map-int-values", lambda t: hf_dir(t, index=lambda wm: {"weight_map": {k: 1 for k in wm}}), r"'weight_map' must map each tensor name"),
    ("weight_map-missing", lambda t: hf_dir(t, index=lambda wm: {"metadata": {}}), r"'weight_map' must map"),
    ("weight_map-outside-dotdot", lambda t: hf_dir(t, index=lambda wm: {"weight_map": {**wm, "wte.weight": "../model-00001.safetensors"}}), r"shard '\.\./model-00001\.safetensors'; a shard must be a file name in the model's directory"),
    ("weight_map-absolute", lambda t: hf_dir(t, index=lambda wm: {"weight_map": {**wm, "wte.weight": "/etc/passwd"}}), r"shard '/etc/passwd'"),
    ("weight_map-names-a-folder", lambda t: hf_dir(t, index=lambda wm: {"weight_map": {**wm, "wte.weight": "."}}), r"shard '\.'"),
    ("meta-pkl-mixed-keys", lambda t: nanogpt_dir(t, meta={"itos": {0: "a", "1": "b"}}), r"meta.pkl: 'itos' must map the ids 0..n-1"),
    ("meta-pkl-unhashable-ids", lambda t: nanogpt_dir(t, meta={"stoi": {"a": [0], "b": [1]}}), r"meta.pkl: 'stoi' must map characters to the ids"),
    ("meta-pkl-list-characters", lambda t: nanogpt_dir(t, meta={"itos": {0: ["a"], 1: "b"}}), r"entry \['a'\] is not one character"),
    ("meta-pkl-os-system", lambda t: nanogpt_dir(t, meta=meta_pickle(b"cposix\nsystem\nX\x04\x00\x00\x00true\x85R")), r"meta.pkl: not a plain nanoGPT vocabulary \(refused to load posix.system"),
    ("meta-pkl-copies-past-budget", lambda t: nanogpt_dir(t, meta=meta_pickle(b"X" + (2**20).to_bytes(4, "little") + b"a" * 2**20 + b"q\x00" + b"c__builtin__\nlist\nq\x01" + b"0h\x01h\x00\x85R" * 5)), r"copy more than 4194304 items"),
    ("ckpt-model-int-keys", lambda t: nanogpt_dir(t, model=lambda sd: sd.update({0: torch.zeros(1)})), r"ckpt.pt: 'model' has the key 0"),
    ("ckpt-model-non-tensor", lambda t: nanogpt_dir(t, model=lambda sd: sd.update({"_orig_mod.transformer.wte.weight": [1.0, 2.0]})), r"transformer.wte.weight is a list, not a tensor"),
    ("ckpt-sparse-tensor", lambda t: nanogpt_dir(t, model=lambda sd: sd.update({"_orig_mod.transformer.ln_f.weight": sd["_orig_mod.transformer.ln_f.weight"].to_sparse()})), r"transformer.ln_f.weight is a torch.sparse_coo tensor"),
    ("ckpt-meta-tensor", lambda t: nanogpt_dir(t, model=lambda sd: sd.update({"_orig_mod.transformer.wpe.weight": torch.empty(16, 16, device="meta")})), r"transformer.wpe.weight is a meta tensor and holds no values"),
    ("ckpt-protocol-4", lambda t: nanogpt_dir(t, protocol=4), r"ckpt.pt: written with a pickle protocol \(4 or 5\)"),
    ("pytorch_model.bin-int-keys", lambda t: bin_dir(t, {0: torch.zeros(2)}), r"pytorch_model.bin: not a state dict of tensors"),
    ("native-nan-weight", lambda t: native_dir(t, tensors=set_weight("transformer.h.1.mlp.c_fc.weight", 7, float("nan"))), r"model.safetensors: transformer.h.1.mlp.c_fc.weight holds NaN or infinite values; the checkpoint is damaged"),
    ("hf-inf-weight", lambda t: hf_dir(t, tensors=set_weight("wte.weight", 0, float("inf"))), r"transformer.wte.weight holds NaN or infinite values"),
    ("nanogpt-inf-weight", lambda t: nanogpt_dir(t, model=set_weight("_orig_mod.transformer.ln_f.weight", 3, -float("inf"))), r"ckpt.pt: transformer.ln_f.weight holds NaN or infinite"),
    ("init_from-unknown-user", lambda t: "~nosuchuser_hostile/x", r"init_from='~nosuchuser_hostile/x': cannot expand '~'"),
    ("init_from-name-too-long", lambda t: "a" * 5000, r"init_from='aaaa.*"),
    ("init_from-nul-byte", lambda t: "gpt2\x00", r"init_from='gpt2\\x00'"),
    # --- sizes checked before anything is allocated (fast here; see also BOMBS)
    ("n_embd-over-limit", lambda t: native_dir(t, model_field("n_embd", 2**17)), r"n_embd=131072: must be a positive integer, at most 65536"),
    ("vocab-over-limit", lambda t: hf_dir(t, setter("vocab_size", 2**20 + 1)), r"vocab_size=1048577: .* at most 1048576"),
    ("block_size-over-limit", lambda t: hf_dir(t, setter("n_positions", 2**21)), r"config.json: model config n_positions=2097152: .* at most 1048576"),
    ("parameters-over-limit", lambda t: native_dir(t, lambda c: c["model"].update(n_layer=1000, n_embd=65536, n_head=1)), r"describes 5.15e\+04 billion parameters, over the limit of 17.2 billion"),
]


def bin_dir(tmp, state_dict):
    d = tmp / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    torch.save(state_dict, d / "pytorch_model.bin")
    return str(d)


@pytest.mark.parametrize("build,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_one_line(tmp_path, build, expect):
    init_from = build(tmp_path)
    with pytest.raises(CheckpointError, match=expect) as e:
        load_model(init_from)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message


def test_float16_overflow_is_refused_with_a_way_out(tmp_path):
    # 1e5 is finite in float32 but beyond float16's 65504: inf after the cast
    d = native_dir(tmp_path, tensors=set_weight("transformer.wpe.weight", 0, 1e5))
    assert torch.isfinite(load_model(d).model.transformer.wpe.weight).all()
    with pytest.raises(CheckpointError, match=r"wpe.weight holds NaN or infinite values in "
                                              r"float16, whose largest value is 65504: load it "
                                              r"in float32 or bfloat16"):
        load_model(d, dtype="float16")


def test_model_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    d = native_dir(tmp_path)
    n = loader.parameter_count(tiny_gpt().config)
    monkeypatch.setattr(loader, "_device_memory", lambda device: 4 * n - 1)  # one byte short
    with pytest.raises(CheckpointError, match=rf"model.safetensors: the model needs "
                                              rf"{4 * n / 1e9:.3g} GB in float32 but cpu has"):
        load_model(d)
    monkeypatch.setattr(loader, "_device_memory", lambda device: 4 * n)
    load_model(d)


@pytest.mark.parametrize("config", [
    GPTConfig(block_size=7, vocab_size=11, n_layer=3, n_head=2, n_embd=8),
    GPTConfig(block_size=5, vocab_size=3, n_layer=1, n_head=1, n_embd=4, bias=False),
    GPTConfig(),  # GPT-2 124M: 124,439,808
])
def test_parameter_count_is_the_models(config):
    with torch.device("meta"), loader._init_skipped():  # no init: meta tensors hold nothing
        model = GPT(config)
    assert loader.parameter_count(config) == sum(p.numel() for p in model.parameters())
    if config == GPTConfig():
        assert loader.parameter_count(config) == 124_439_808


def test_meta_pkl_constructors_keep_working_for_plain_values(tmp_path):
    # what older pickle protocols write for plain values goes through find_class and must load
    # (bytes and bytearray before protocol 3 go through _codecs.encode, which stays refused)
    path = tmp_path / "meta.pkl"
    for protocol in (0, 2, 3, 4):
        meta = {"itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)},
                "extra": [set("ab"), frozenset("c"), 1.5, True, 10**30]
                + ([bytearray(b"xy"), b"z"] if protocol >= 3 else [])}
        path.write_bytes(pickle.dumps(meta, protocol=protocol))
        assert loader.read_meta_pkl(path) == meta, protocol


@pytest.mark.parametrize("kind", ["fifo", "device", "too-large"])
def test_meta_pkl_only_a_bounded_regular_file_is_read(tmp_path, kind):
    path = tmp_path / "meta.pkl"
    if kind == "fifo":
        fifo_with_a_writer(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(loader.MAX_META_PKL_BYTES + 1)  # sparse: no disk used
    expect = "over the 32 MiB limit" if kind == "too-large" else "not a regular file"
    with pytest.raises(CheckpointError, match=expect):
        loader.read_meta_pkl(path)


def fifo_with_a_writer(path):
    """A FIFO, which a reader without a writer waits on forever. A thread opens it for writing
    and closes it, so that a lost check fails (reading nothing) instead of hanging the suite."""
    os.mkfifo(path)
    threading.Thread(target=lambda: open(path, "wb").close(), daemon=True).start()


def test_gpt2_vocabulary_files_must_be_regular_files(tmp_path):
    from nanosample.tokenizer import GPT2_BPE_DIR, TokenizerError, gpt2_tokenizer
    (tmp_path / "encoder.json").write_bytes((GPT2_BPE_DIR / "encoder.json").read_bytes())
    fifo_with_a_writer(tmp_path / "vocab.bpe")
    with pytest.raises(TokenizerError, match=r"vocab.bpe: not a regular file"):
        gpt2_tokenizer(str(tmp_path))


def test_config_json_over_the_limit_is_not_read(tmp_path):
    d = Path(native_dir(tmp_path))
    with open(d / "config.json", "r+b") as f:
        f.truncate(loader.MAX_JSON_BYTES + 1)
    with pytest.raises(CheckpointError, match=r"config.json: 33554433 bytes, over the 32 MiB limit"):
        load_model(str(d))


# ----------------------------------------------------------------------------- bombs

def zip_bomb(tmp):
    """A ckpt.pt whose pickle record is deflated: 64 KiB on disk, 64 MiB once inflated (a real
    bomb declares gigabytes; torch.save never compresses, so either is refused unread)."""
    d = Path(nanogpt_dir(tmp))
    plain = d / "ckpt.pt"
    bomb = d / "bomb.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data += b"\0" * (64 * 2**20)  # after the STOP opcode: ignored by the unpickler
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, data)
    os.replace(bomb, plain)
    return str(d)


def fifo_shard(tmp):
    d = Path(hf_dir(tmp, index=lambda wm: {"weight_map": {**wm, "wte.weight": "fifo.safetensors"}}))
    os.mkfifo(d / "fifo.safetensors")  # safe_open on it would block forever
    return str(d)


# A size that would take minutes and gigabytes if it were built before being checked, a
# bytearray(2e9) from 30 bytes of meta.pkl, a zip bomb, a FIFO. Run in one subprocess whose
# address space is limited to MEMORY_LIMIT: losing a check is a MemoryError or a timeout there.
BOMBS = [
    ("n_layer-100000", lambda t: native_dir(t, model_field("n_layer", 100000)), r"n_layer=100000: must be a positive integer, at most 1000"),
    ("n_layer-1e9", lambda t: hf_dir(t, setter("n_layer", 10**9)), r"n_layer=1000000000: must be"),
    ("n_layer-4000-digits", write("config.json", NATIVE_HEAD + '{"n_layer": 1' + "0" * 3999 + "}}"), r"n_layer=<an integer of 1328\d bits>: must be a positive integer, at most 1000"),
    ("all-sizes-at-their-limits", lambda t: hf_dir(t, lambda c: c.update(n_layer=1000, n_embd=65536, n_head=64, vocab_size=2**20, n_positions=2**20)), r"billion parameters, over the limit"),
    ("meta-pkl-bytearray-2e9", lambda t: nanogpt_dir(t, meta=meta_pickle(b"c__builtin__\nbytearray\nJ\x00\x94\x35\x77\x85R")), r"meta.pkl: not a plain nanoGPT vocabulary \(refused bytearray\(2000000000,\)"),
    ("meta-pkl-bytes-8e9", lambda t: nanogpt_dir(t, meta=meta_pickle(b"c__builtin__\nbytes\n\x8a\x05\x00\x50\xd6\xdc\x01\x85R")), r"refused bytes\(8000000000,\)"),
    ("ckpt-zip-bomb", zip_bomb, r"ckpt.pt: refused, its record '.*data.pkl' is compressed"),
    ("shard-is-a-fifo", fifo_shard, r"fifo.safetensors: not a regular file"),
    # torch warns about protocol 4 before failing; the stderr check in bomb_results covers it
    ("ckpt-protocol-4-silent", lambda t: nanogpt_dir(t, protocol=4), r"pickle protocol \(4 or 5\)"),
]

BOUNDED_LOADER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from nanosample import loader
for line in sys.stdin.read().splitlines():
    name, init_from = line.split("\\t")
    try:
        loader.load_model(init_from)
        print(name, "LOADED", flush=True)
    except loader.CheckpointError as e:
        print(name, "CheckpointError", e, flush=True)
    except BaseException as e:
        print(name, "ESCAPED", type(e).__name__, e, flush=True)
"""


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    lines = []
    for name, build, _ in BOMBS:
        lines.append(f"{name}\t{build(tmp_path_factory.mktemp(name))}")
    out = subprocess.run([sys.executable, "-c", BOUNDED_LOADER.format(limit=MEMORY_LIMIT)],
                         input="\n".join(lines), env=BOUNDED_ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr  # no warnings, no retries, nothing before our error
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()}


@pytest.mark.parametrize("name,expect", [(c[0], c[2]) for c in BOMBS], ids=[c[0] for c in BOMBS])
def test_bomb_is_refused_in_bounded_memory(bomb_results, name, expect):
    result = bomb_results[name]
    assert result.startswith("CheckpointError "), result
    assert re.search(expect, result), result


# ----------------------------------------------------------------------------- the hub

class DroppingServer:
    """A local socket that reads each request's first line and closes the connection without an
    answer: the hub, unreachable. `requests` lists the lines, e.g. "HEAD /.../config.json"."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n")[0].decode("latin-1"))
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_hub_call_is_quiet_and_without_retries(monkeypatch):
    """Inside the config.json call the hub's retry tuples are empty, its logging is at error
    level and its progress bars off; afterwards, all as they were."""
    import logging

    import huggingface_hub
    from huggingface_hub import file_download
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import logging as hub_logging

    before = (file_download._DEFAULT_RETRY_ON_EXCEPTIONS, hub_logging.get_verbosity())
    seen = []

    def offline(repo_id, filename, **kwargs):
        seen.append((file_download._DEFAULT_RETRY_ON_EXCEPTIONS,
                     file_download._DEFAULT_RETRY_ON_STATUS_CODES, hub_logging.get_verbosity(),
                     are_progress_bars_disabled()))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as e:
        load_model("gpt2")
    assert seen == [((), (), logging.ERROR, True)]
    assert (file_download._DEFAULT_RETRY_ON_EXCEPTIONS, hub_logging.get_verbosity()) == before
    message = str(e.value)
    assert message.startswith("gpt2: could not download openai-community/gpt2 from the Hugging "
                              "Face hub (OSError: [Errno -3] Temporary failure in name resolution)")
    assert "pass its directory" in message and "HF_HUB_OFFLINE=1" in message


# ----------------------------------------------------------------------------- end to end

def folder(tmp, name):
    (tmp / name).mkdir()
    return tmp / name


def run_sample(init_from, env=None):
    """sample.py --init_from=... in a subprocess limited to MEMORY_LIMIT of address space."""
    script = ("import resource, runpy, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
              f"sys.argv = ['sample.py', {'--init_from=' + init_from!r}, '--max_new_tokens=3']\n"
              "runpy.run_path('sample.py', run_name='__main__')\n")
    return subprocess.Popen([sys.executable, "-c", script], env={**BOUNDED_ENV, **(env or {})},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sample_py_end_to_end(tmp_path):
    """Each case through the CLI: exit 2, nothing on stdout, one stderr line `error: ...`.
    The runs go in parallel; 60 s is a safety timeout, not a measurement."""
    server = DroppingServer()
    hub = {"HF_ENDPOINT": f"http://127.0.0.1:{server.port}", "HF_HOME": str(tmp_path / "hf-home")}
    cases = {
        "n_layer-100000": (hf_dir(folder(tmp_path, "b"), setter("n_layer", 100000)), None,
                           r"^error: .*config.json: model config n_layer=100000"),
        "nan-weights": (nanogpt_dir(folder(tmp_path, "c"),
                                    model=set_weight("_orig_mod.transformer.wte.weight", 5,
                                                     float("nan"))),
                        None, r"^error: .*ckpt.pt: transformer.wte.weight holds NaN"),
        "meta-pkl-bytearray": (nanogpt_dir(folder(tmp_path, "d"),
                                           meta=meta_pickle(b"c__builtin__\nbytearray\nJ\x00\x94\x35\x77\x85R")),
                               None, r"^error: .*meta.pkl: .*refused bytearray"),
        "hub-offline": ("gpt2", hub, r"^error: gpt2: could not download openai-community/gpt2 .*HF_HUB_OFFLINE=1"),
    }
    procs = {name: run_sample(init_from, env) for name, (init_from, env, _) in cases.items()}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=60)
            lines = stderr.splitlines()
            assert proc.returncode == 2, (name, stderr)
            assert stdout == "", (name, stdout)
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
            assert re.search(cases[name][2], lines[0]), (name, lines[0])
    finally:
        for proc in procs.values():
            proc.kill()
        server.close()
    # the hub was asked once for config.json, and not again: no retries (huggingface_hub may
    # also make a request of its own in the background; only the file's are counted)
    asked = [r for r in server.requests if "/openai-community/gpt2/" in r]
    assert asked == ["HEAD /openai-community/gpt2/resolve/main/config.json HTTP/1.1"], server.requests


# ----------------------------------------------------------------------------- no code runs

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_ckpt_pt_with_pickled_code_is_refused_in_every_format(tmp_path, fmt):
    marker = tmp_path / "pwned"
    ckpt = {"model": {}, "model_args": {}, "x": _Exploit(marker)}
    path = tmp_path / "ckpt.pt"
    if fmt == "raw-pickle":
        path.write_bytes(pickle.dumps(ckpt, protocol=2))
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(CheckpointError, match=r"ckpt.pt: (refused|cannot read)"):
        load_model(str(path))
    assert not marker.exists(), "the pickled command ran"


def test_legacy_format_ckpt_still_loads(tmp_path):
    # the pre-1.6 format cannot be memory-mapped; it is read whole, after torch's size checks
    gpt = tiny_gpt(bias=False, gelu="exact")
    cfg = gpt.config
    args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                block_size=cfg.block_size, bias=False, vocab_size=cfg.vocab_size)
    torch.save({"model": gpt.state_dict(), "model_args": args}, tmp_path / "ckpt.pt",
               _use_new_zipfile_serialization=False)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate(CHARS))}))
    loaded = load_model(str(tmp_path))
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the same weights; the loaded model's products round their own way
        assert torch.allclose(loaded.model(idx), gpt(idx), rtol=0, atol=1e-6)
