"""loader.py: every checkpoint format against its reference, and every error a user can cause.

Reference checkpoints are written here, offline, by transformers (`save_pretrained`) and in
nanoGPT's ckpt.pt layout; the models are tiny (n_embd 32-64) so the file runs in seconds.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanosample import loader
from nanosample.loader import CheckpointError, load_model, save_native
from nanosample.model import GPT, GPTConfig, KVCache
from nanosample.tokenizer import CharTokenizer, gpt2_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a busy machine the threads' hand-offs
    # cost ~100x: a 2-layer forward takes 0.2 s with two contended threads, 1.5 ms with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_hf_dir(directory, seed=0, prefix=True, **config):
    """A GPT2LMHeadModel with random weights saved by save_pretrained; returns the HF model.

    prefix=False rewrites the file without the "transformer." prefix, the hub's own layout.
    """
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, **config}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.save_pretrained(directory)
    path = Path(directory) / "model.safetensors"
    tensors = load_file(path)
    assert all(k.startswith("transformer.") for k in tensors), "save_pretrained's layout changed"
    if not prefix:
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})
    return hf


def one_line_error(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ----------------------------------------------------------------------------- Hugging Face

PARITY_CONFIGS = [
    dict(n_layer=1, n_head=2, n_embd=32, n_positions=1024),
    dict(n_layer=3, n_head=4, n_embd=48, n_positions=40),
    dict(n_layer=2, n_head=8, n_embd=64, n_positions=128, activation_function="gelu",
         layer_norm_epsilon=1e-6),
]


@pytest.mark.parametrize("prefix", [True, False], ids=["transformer-prefix", "hub-layout"])
@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=["1x32", "3x48-pos40", "2x64-exact-gelu"])
def test_hf_logit_parity(tmp_path, config, prefix):
    hf = write_hf_dir(tmp_path, seed=1, prefix=prefix, **config)
    loaded = load_model(str(tmp_path))
    T = min(config["n_positions"], 40)
    idx = torch.randint(0, 50257, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.model(idx)
        ref = hf(idx).logits
    assert ours.shape == ref.shape == (3, T, 50257)
    assert (ours - ref).abs().max().item() <= 1e-4
    cfg = loaded.model.config
    assert cfg.block_size == config["n_positions"]
    assert cfg.gelu == ("exact" if config.get("activation_function") == "gelu" else "tanh")
    assert cfg.layer_norm_epsilon == config.get("layer_norm_epsilon", 1e-5)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert all(p.is_contiguous() for p in loaded.model.parameters())  # Conv1D transposed by copy
    assert loaded.tokenizer is gpt2_tokenizer()
    assert not loaded.model.training


def test_hf_pytorch_model_bin_with_buffers_and_lm_head(tmp_path):
    # the older file: pytorch_model.bin, hub layout, mask buffers and a stored lm_head
    hf = write_hf_dir(tmp_path, seed=3, n_layer=2)
    (tmp_path / "model.safetensors").unlink()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path))
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def peaked_hf_model(directory):
    # initializer_range 0.5 (GPT-2's is 0.02) makes the logits peaked: the argmax is never a near-tie
    return write_hf_dir(directory, seed=4, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                        initializer_range=0.5)


def greedy_with_cache(model, prompt, steps):
    """The tiny greedy loop: prefill the prompt, then one token per step through the cache."""
    B, T = prompt.shape
    cache = KVCache(model.config, B, max_len=T + steps)
    ids = prompt
    logits = model(prompt, cache=cache, last_only=True)  # (B, 1, V)
    margins = []
    for _ in range(steps):
        top2 = logits[:, -1].topk(2, dim=-1).values  # (B, 2)
        margins.append((top2[:, 0] - top2[:, 1]).min().item())
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
        logits = model(nxt, cache=cache, last_only=True)
    return ids, min(margins)


def test_greedy_with_kv_cache_matches_transformers_generate(tmp_path):
    hf = peaked_hf_model(tmp_path)
    model = load_model(str(tmp_path)).model
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(5))
    steps = 48
    with torch.no_grad():
        ours, margin = greedy_with_cache(model, prompt, steps)
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert margin > 1e-2, "the test model's logits are not peaked enough to compare argmaxes"
    assert ref.shape == (2, 6 + steps)
    assert ours.tolist() == ref.tolist()


def test_kv_cache_decode_equals_full_forward_every_step(tmp_path):
    write_hf_dir(tmp_path, seed=6, n_layer=3, n_head=4, n_embd=48, n_positions=64)
    model = load_model(str(tmp_path)).model
    B, T0, steps = 3, 5, 24
    seq = torch.randint(0, 50257, (B, T0 + steps + 4), generator=torch.Generator().manual_seed(7))
    cache = KVCache(model.config, B)
    with torch.no_grad():
        full = model(seq)  # (B, T, V): the reference for every position
        cached = model(seq[:, :T0], cache=cache)
        assert (cached - full[:, :T0]).abs().max().item() <= 1e-5
        for t in range(T0, T0 + steps):  # decode: one token per step
            step = model(seq[:, t:t + 1], cache=cache)  # (B, 1, V)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5, f"step {t}"
        # a chunk of 4 after the cached positions (prefill continuing a cache)
        chunk = model(seq[:, T0 + steps:], cache=cache)
        assert (chunk - full[:, T0 + steps:]).abs().max().item() <= 1e-5
    assert cache.pos == seq.shape[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_runs(tmp_path, dtype):
    write_hf_dir(tmp_path, seed=8)
    ref = load_model(str(tmp_path)).model
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    half = load_model(str(tmp_path), dtype=name).model
    assert {p.dtype for p in half.parameters()} == {dtype}
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = ref(idx), half(idx)
    assert b.dtype == dtype and torch.isfinite(b).all()
    scale = a.abs().max().item()
    assert (b.float() - a).abs().max().item() <= 0.05 * scale
    # the same argmax almost everywhere (bf16 keeps ~3 significant digits)
    assert (b.float().argmax(-1) == a.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device(tmp_path):
    write_hf_dir(tmp_path, seed=10)
    model = load_model(str(tmp_path), device="cuda", dtype=torch.bfloat16).model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    idx = torch.randint(0, 50257, (2, 8), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(idx).float()).all()


# ----------------------------------------------------------------------------- nanoGPT

def nanogpt_model(vocab_size=50304, seed=11, block_size=32):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                       n_embd=32, bias=False, gelu="exact")
    return GPT(config).eval()


def write_nanogpt_ckpt(directory, model, mask_buffers=False):
    """ckpt.pt exactly as nanoGPT's train.py writes it from a torch.compile'd model."""
    cfg = model.config
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    if mask_buffers:  # nanoGPT without flash attention registers its causal mask as "bias"
        for i in range(cfg.n_layer):
            sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(
                torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, cfg.block_size, cfg.block_size)
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                      block_size=cfg.block_size, bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0)
    ckpt = {
        "model": sd,
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        "model_args": model_args,
        "iter_num": 5000,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"out_dir": "out-shakespeare-char", "dataset": "shakespeare_char",
                   "learning_rate": 1e-3, "compile": True},
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, Path(directory) / "ckpt.pt")


def test_nanogpt_gpt2_vocab_loads_and_runs(tmp_path):
    ref = nanogpt_model()
    write_nanogpt_ckpt(tmp_path, ref, mask_buffers=True)
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = ref(idx)
    for init_from, out_dir in [(str(tmp_path / "ckpt.pt"), "out"), (str(tmp_path), "out"),
                               ("resume", str(tmp_path))]:
        loaded = load_model(init_from, out_dir=out_dir)
        cfg = loaded.model.config
        assert (cfg.vocab_size, cfg.bias, cfg.gelu) == (50304, False, "exact")
        assert loaded.tokenizer is gpt2_tokenizer()
        assert loaded.info["iter_num"] == 5000
        assert loaded.info["best_val_loss"] == pytest.approx(1.4697)
        with torch.no_grad():
            logits = loaded.model(idx)
        assert logits.shape == (2, 20, 50304)
        assert torch.equal(logits, expected)
        # the padding rows 50257..50303 are never decodable
        assert loaded.tokenizer.decode([50300]) == ""


def test_nanogpt_char_meta_pkl_round_trips(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    chars = sorted(set(text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    ref = nanogpt_model(vocab_size=len(chars))
    write_nanogpt_ckpt(tmp_path, ref)
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    loaded = load_model(str(tmp_path))
    tok = loaded.tokenizer
    assert isinstance(tok, CharTokenizer) and tok.chars == chars
    ids = tok.encode(text)
    assert ids == [meta["stoi"][c] for c in text]
    assert tok.decode(ids) == text
    with torch.no_grad():
        assert torch.equal(loaded.model(torch.tensor([ids[:32]])), ref(torch.tensor([ids[:32]])))


def test_nanogpt_meta_pkl_in_the_checkouts_data_folder(tmp_path):
    # nanoGPT's own layout: <checkout>/out-shakespeare-char/ckpt.pt and
    # <checkout>/data/shakespeare_char/meta.pkl, found through the checkpoint's config["dataset"]
    chars = list("\n !abcdefgh")
    write_nanogpt_ckpt(tmp_path / "out-shakespeare-char", nanogpt_model(vocab_size=len(chars)))
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    with open(tmp_path / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    loaded = load_model("resume", out_dir=str(tmp_path / "out-shakespeare-char"))
    assert loaded.tokenizer.chars == chars
    assert loaded.info["meta_pkl"].endswith("data/shakespeare_char/meta.pkl")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_meta_pkl_is_refused(tmp_path):
    write_nanogpt_ckpt(tmp_path, nanogpt_model(vocab_size=65))
    marker = tmp_path / "pwned"
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    message = one_line_error(e)
    assert "meta.pkl" in message and "system" in message
    assert not marker.exists(), "the pickled command ran"


def test_nanogpt_small_vocab_without_meta_pkl(tmp_path):
    write_nanogpt_ckpt(tmp_path, nanogpt_model(vocab_size=65))
    with pytest.raises(CheckpointError, match="vocab_size=65.*meta.pkl") as e:
        load_model(str(tmp_path / "ckpt.pt"))
    one_line_error(e)


# ----------------------------------------------------------------------------- native format

@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_native_round_trip(tmp_path, kind):
    if kind == "char":
        tok = CharTokenizer(list("\n !',-.:;?ABCabc"))
        model = nanogpt_model(vocab_size=tok.n_vocab)
    else:
        tok = gpt2_tokenizer()
        torch.manual_seed(13)
        model = GPT(GPTConfig(block_size=24, n_layer=2, n_head=4, n_embd=32)).eval()
    extra = {"recipe": {"max_iters": 100, "lr": 1e-3}, "val_loss": 1.5}
    save_native(model, tok, tmp_path / "ckpt", extra)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.model.config == model.config
    assert loaded.tokenizer.config() == tok.config()
    assert loaded.info["training"] == extra
    assert "nanosample" in loaded.source
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    idx = torch.randint(0, tok.n_vocab, (2, 16), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), model(idx))
    # saving over the loaded checkpoint while its tensors are still memory-mapped
    save_native(loaded.model, loaded.tokenizer, tmp_path / "ckpt", extra)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "ckpt")).model(idx), model(idx))


def test_shipped_checkpoint_by_bare_name(tmp_path, monkeypatch):
    tok = CharTokenizer(list("ab\n"))
    save_native(nanogpt_model(vocab_size=3), tok, tmp_path / "tiny_char")
    monkeypatch.setattr(loader, "PROJECT_CHECKPOINTS", tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # so "tiny_char" is not also a path from here
    assert load_model("tiny_char").tokenizer.chars == ["a", "b", "\n"]


# ----------------------------------------------------------------------------- errors

def test_unknown_model_name():
    with pytest.raises(CheckpointError) as e:
        load_model("gpt3-xxl")
    message = one_line_error(e)
    assert "'gpt3-xxl'" in message and "gpt2-medium" in message
    with pytest.raises(CheckpointError, match="did you mean 'gpt2-medium'"):
        load_model("gpt2-meduim")


def test_missing_files(tmp_path):
    write_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights") as e:
        load_model(str(tmp_path / "hf"))
    assert str(tmp_path / "hf") in one_line_error(e)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found") as e:
        load_model(str(tmp_path / "empty"))
    one_line_error(e)

    with pytest.raises(CheckpointError, match="ckpt.pt: not found") as e:
        load_model("resume", out_dir=str(tmp_path / "empty"))
    one_line_error(e)

    save_native(nanogpt_model(vocab_size=3), CharTokenizer("abc"), tmp_path / "native")
    (tmp_path / "native" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: not found") as e:
        load_model(str(tmp_path / "native"))
    one_line_error(e)


@pytest.mark.parametrize("damage", ["truncated", "garbled-header", "empty"])
def test_damaged_safetensors(tmp_path, damage):
    write_hf_dir(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbled-header":
        data = b"\xff" * 16 + data[16:]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    message = one_line_error(e)
    assert str(path) in message and "truncated or corrupted" in message


def test_damaged_ckpt_pt(tmp_path):
    write_nanogpt_ckpt(tmp_path, nanogpt_model())
    path = tmp_path / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    assert str(path) in one_line_error(e)


def test_ckpt_pt_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "model_args": {}, "x": _Exploit(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt: refused") as e:
        load_model(str(tmp_path))
    one_line_error(e)
    assert not marker.exists()


@pytest.mark.parametrize("change,expect", [
    ({"n_layer": 3}, r"missing transformer\.h\.2\."),
    ({"n_layer": 1}, r"unexpected transformer\.h\.1\."),
    ({"n_embd": 64}, r"has shape \(\d+, 32\) but the config needs \(\d+, 64\)"),
    ({"n_positions": 128}, r"transformer\.wpe\.weight has shape \(64, 32\)"),
])
def test_config_that_does_not_match_the_weights(tmp_path, change, expect):
    import json
    write_hf_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expect) as e:
        load_model(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in one_line_error(e)


def test_bad_dtype_and_device(tmp_path):
    write_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="dtype=int8: must be one of float32, bfloat16, float16"):
        load_model(str(tmp_path), dtype="int8")
    with pytest.raises(ValueError, match="device=tpu"):
        load_model(str(tmp_path), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda: CUDA is not available"):
            load_model(str(tmp_path), device="cuda")


def test_unsupported_hf_config(tmp_path):
    write_hf_dir(tmp_path, activation_function="relu")
    with pytest.raises(CheckpointError, match="activation_function 'relu'") as e:
        load_model(str(tmp_path))
    one_line_error(e)


def test_hub_failure_is_one_line_naming_a_local_directory(monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise OSError("Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        load_model("gpt2-medium")
    message = one_line_error(e)
    assert calls == [("openai-community/gpt2-medium", "config.json")]
    assert "openai-community/gpt2-medium" in message and "name resolution" in message
    assert "local copy" in message and "init_from" in message


def test_offline_hub_and_no_transformers_at_run_time(tmp_path):
    """In a fresh interpreter: HF_HUB_OFFLINE with an empty cache fails in one line, touching
    no network; loading a checkpoint never imports transformers."""
    save_native(nanogpt_model(vocab_size=3), CharTokenizer("abc"), tmp_path / "native")
    script = (
        "import sys\nfrom nanosample import loader\n"
        f"loader.load_model({str(tmp_path / 'native')!r})\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "try:\n"
        "    loader.load_model('gpt2')\n"
        "except loader.CheckpointError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1, out.stdout
    assert "openai-community/gpt2" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "init_from" in lines[0]
