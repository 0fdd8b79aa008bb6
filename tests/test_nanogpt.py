"""nanoGPT users' workflow: their command, their config files, their checkpoint, their
exact text.

The checkpoint is a tiny seeded model saved the way nanoGPT's train.py saves one, in a nanoGPT
checkout's layout: <checkout>/out-shakespeare-char/ckpt.pt and
<checkout>/data/shakespeare_char/meta.pkl; sample.py runs with the checkout as its working
directory, as a nanoGPT user runs it. The reference is nanoGPT's sample.py written out here:
seed the global stream, build the model (whose initialisation draws from that stream on the
CPU), load the checkpoint, then for each sample nanoGPT's generate: crop, forward,
/ temperature, top-k, softmax, torch.multinomial.
"""

import math
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from conftest import sample_py  # with cwd= the checkout, as a nanoGPT user runs it
from nanosample import explain, generate, loader, sampling
from nanosample.model import GPT, GPTConfig
from nanosample.settings import SampleSettings, SettingsError, read_settings
from nanosample.tokenizer import CharTokenizer, gpt2_tokenizer

REPO = Path(__file__).resolve().parent.parent
NANOGPT_CONFIGS = REPO / "tests" / "data" / "nanogpt_config"
NANOGPT_TOML = str(REPO / "configs" / "nanogpt.toml")
SEPARATOR = "---------------"
CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"
                   "All:\nSpeak, speak.\nROMEO:\n"))
BLOCK = 16


def tiny_model(vocab_size, seed):
    """A nanoGPT-shaped model (no biases, exact GELU) whose distributions are far from flat."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=BLOCK, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                       bias=False, gelu="exact")
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model


def save_as_nanogpt(model, out_dir, dataset):
    """ckpt.pt as nanoGPT's train.py writes it (from a torch.compile'd model)."""
    c = model.config
    out_dir.mkdir(parents=True)
    torch.save({
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
        "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                           block_size=c.block_size, bias=c.bias, vocab_size=c.vocab_size,
                           dropout=0.0),
        "iter_num": 250, "best_val_loss": torch.tensor(2.5),
        "config": {"out_dir": out_dir.name, "dataset": dataset},
    }, out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A nanoGPT checkout after training: the character model and a GPT-2 BPE one."""
    root = tmp_path_factory.mktemp("nanogpt")
    save_as_nanogpt(tiny_model(len(CHARS), seed=3), root / "out-shakespeare-char",
                    "shakespeare_char")
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                     "stoi": {c: i for i, c in enumerate(CHARS)}}, f)
    save_as_nanogpt(tiny_model(50304, seed=4), root / "out-owt", "openwebtext")  # no meta.pkl: BPE
    (root / "out-empty").mkdir()
    return root


# ---------------------------------------------------------------------------------------------
# nanoGPT's sample.py, written out

class NanoGPTSkeleton(nn.Module):
    """nanoGPT's GPT.__init__ without its forward: its modules built in its order, then its
    initialisation. Building it draws from the global CPU stream what nanoGPT's does."""

    def __init__(self, c):
        super().__init__()
        C = c.n_embd

        def block():
            return nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(C, bias=c.bias),
                attn=nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C, bias=c.bias),
                                        c_proj=nn.Linear(C, C, bias=c.bias),
                                        attn_dropout=nn.Dropout(), resid_dropout=nn.Dropout())),
                ln_2=nn.LayerNorm(C, bias=c.bias),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C, bias=c.bias), gelu=nn.GELU(),
                                       c_proj=nn.Linear(4 * C, C, bias=c.bias),
                                       dropout=nn.Dropout()))))

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, C), wpe=nn.Embedding(c.block_size, C),
            drop=nn.Dropout(), h=nn.ModuleList([block() for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(C, bias=c.bias)))
        self.lm_head = nn.Linear(C, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


@torch.no_grad()
def nanogpt_generate(model, idx, max_new_tokens, temperature, top_k):
    """nanoGPT's GPT.generate, on our model's plain (cache-free) forward."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = model(idx_cond)[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def nanogpt_sample_py(out_dir, start, num_samples, max_new_tokens, temperature=0.8, top_k=200,
                      seed=1337, init_draws=True):
    """What nanoGPT's sample.py prints after its preamble, on the CPU in float32."""
    loaded = loader.load_model("resume", out_dir=str(out_dir))  # before seeding: draws nothing
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(seed)
    if init_draws:
        NanoGPTSkeleton(model.config)  # nanoGPT builds its GPT here; load_state_dict draws nothing
    x = torch.tensor(tokenizer.encode(start), dtype=torch.long)[None, ...]
    out = []
    for _ in range(num_samples):
        y = nanogpt_generate(model, x, max_new_tokens, temperature, top_k)
        out.append(tokenizer.decode(y[0].tolist()) + "\n" + SEPARATOR + "\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# configs/nanogpt.toml prints nanoGPT's text, byte for byte

PARITY = {  # name: (out_dir, sample.py flags, reference arguments)
    "defaults, top_k 200 >= V": ("out-shakespeare-char", [], {}),
    "top_k 5, a prompt": ("out-shakespeare-char", ["--top_k=5", "--start=ROMEO:"],
                          dict(top_k=5, start="ROMEO:")),
    "top_k off, seed 7, T 1.3": ("out-shakespeare-char",
                                 ["--top_k=None", "--seed=7", "--temperature=1.3"],
                                 dict(top_k=None, seed=7, temperature=1.3)),
    "GPT-2 BPE, vocab 50304": ("out-owt", ["--start=Hello, world", "--max_new_tokens=24"],
                               dict(start="Hello, world", max_new_tokens=24)),
}


@pytest.fixture(scope="module")
def parity_runs(checkout):
    def run(case):
        out_dir, flags, _ = PARITY[case]
        return case, sample_py(NANOGPT_TOML, f"--out_dir={out_dir}", "--num_samples=3",
                               "--max_new_tokens=40", *flags, cwd=checkout)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, PARITY))


@pytest.mark.parametrize("case", list(PARITY))
def test_nanogpt_toml_prints_nanogpts_text(checkout, parity_runs, case):
    out_dir, _, reference = PARITY[case]
    code, out, err = parity_runs[case]
    assert code == 0, err
    arguments = dict(start="\n", num_samples=3, max_new_tokens=40) | reference
    expected = nanogpt_sample_py(checkout / out_dir, **arguments)
    assert out == expected
    # 3 different samples, each past the block: the prompt plus 40 (or 24 BPE) new tokens
    texts = out.split("\n" + SEPARATOR + "\n")[:-1]
    assert len(set(texts)) == 3
    assert len(arguments["start"]) + arguments["max_new_tokens"] > BLOCK


def test_the_reference_depends_on_the_initialisation_draws(checkout):
    # Without the draws nanoGPT's model initialisation makes, the text is another one: the
    # parity above would catch a sample.py that seeds the stream and samples at once.
    out_dir = checkout / "out-shakespeare-char"
    assert nanogpt_sample_py(out_dir, "\n", 2, 20) != \
        nanogpt_sample_py(out_dir, "\n", 2, 20, init_draws=False)


@pytest.mark.parametrize("config", [
    GPTConfig(block_size=16, vocab_size=34, n_layer=2, n_head=2, n_embd=32, bias=False),
    GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, bias=True),
    GPTConfig(block_size=5, vocab_size=7, n_layer=3, n_head=1, n_embd=2, bias=True),  # tensors < 16
    GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8, bias=False),
])
def test_nanogpt_generator_is_the_stream_after_nanogpts_initialisation(config):
    torch.manual_seed(1337)
    NanoGPTSkeleton(config)
    expected = torch.rand(16)
    assert torch.equal(torch.rand(16, generator=generate.nanogpt_generator(1337, config, "cpu")),
                       expected)


def test_nanogpt_draw_never_emits_a_padded_id_and_uses_v_numbers_a_step():
    # Padded ids (>= the tokenizer's 50257) get -inf; their columns stay, so the stream moves
    # on by V per step as nanoGPT's does, and nanoGPT's token comes out whenever nanoGPT would
    # not have drawn a padded one.
    V, n_valid = 64, 60
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    logits[0, n_valid:] = 3.0  # the padding rows as likely as the best tokens
    params = sampling.BatchParams([sampling.SamplingParams(temperature=1.0)], V)
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    padded = 0
    for _ in range(200):
        step = sampling.multinomial_step(logits, params, ours, n_valid, candidates=False)
        token = int(sampling.nanogpt_draw(logits, 1.0, 0, theirs)[0])
        assert int(step.tokens[0]) < n_valid and math.isnan(float(step.u[0]))
        if token >= n_valid:
            padded += 1
        else:
            assert int(step.tokens[0]) == token
    assert padded > 0  # the case was met: nanoGPT drew a padding id and we did not
    assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))


def test_crop_context_is_nanogpts_rule(checkout):
    # greedy, so the context rule alone decides: `crop` equals nanoGPT's loop token for token,
    # and the default `half` rule gives another text past block_size.
    loaded = loader.load_model("resume", out_dir=str(checkout / "out-shakespeare-char"))
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.encode("ROMEO:")
    greedy = sampling.SamplingParams(temperature=0.0)

    def tokens(context):
        pieces = generate.generate(model, tokenizer, prompt, greedy, max_new_tokens=40,
                                   context=context)
        return [p.token for p in pieces]

    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(40):
            logits = model(idx[:, -BLOCK:])[:, -1]
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert tokens("crop") == idx[0, len(prompt):].tolist()
    assert tokens("half") != tokens("crop")


def test_explain_with_nanogpts_draw(checkout):
    loaded = loader.load_model("resume", out_dir=str(checkout / "out-shakespeare-char"))
    records = []

    def trace(step):
        records.extend(explain.explain_rows(step, loaded.tokenizer, [0], top=5))

    params = sampling.SamplingParams(temperature=0.8, top_k=5)
    pieces = list(generate.generate(loaded.model, loaded.tokenizer, loaded.tokenizer.encode("\n"),
                                    params, num_samples=2, max_new_tokens=6, trace=trace,
                                    draw="multinomial"))
    assert [r["chosen_id"] for r in records] == [p.token for p in pieces]
    for record in records:
        assert record["draw"] == "multinomial" and record["u"] is None
        assert list(record)[list(record).index("u") + 1] == "draw"
        chosen = [c for c in record["candidates"] if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["kept"] and chosen[0]["top_k"]
        assert record["n_kept"] == 5
    table = explain.format_table(records[0])
    assert "torch.multinomial (nanoGPT's draw, one stream for the run; no u): selected" in table
    # the default draw's records carry no "draw" key and a u
    records.clear()
    list(generate.generate(loaded.model, loaded.tokenizer, loaded.tokenizer.encode("\n"), params,
                           max_new_tokens=2, trace=trace))
    assert all("draw" not in r and r["u"] is not None for r in records)


# ---------------------------------------------------------------------------------------------
# Which model: nanoGPT's command, nanoGPT's config files, and the line naming what loaded

def loaded_line(checkout, out_dir):
    model = loader.load_model("resume", out_dir=str(checkout / out_dir)).model
    return (f"loaded {out_dir}/ckpt.pt (nanoGPT checkpoint): {model.num_params():,} parameters, "
            f"vocabulary {len(CHARS)} from data/shakespeare_char/meta.pkl, block_size {BLOCK}, "
            f"float32 on cpu")


@pytest.fixture(scope="module")
def workflow_runs(checkout):
    short = ["--num_samples=2", "--max_new_tokens=20", "--device=cpu"]
    runs = {
        "readme": ["--out_dir=out-shakespeare-char", *short],
        "resume": ["--init_from=resume", "--out_dir=out-shakespeare-char", *short],
        "training config": [str(NANOGPT_CONFIGS / "train_shakespeare_char.py"), *short],
        "training config, bad prompt": [str(NANOGPT_CONFIGS / "train_shakespeare_char.py"),
                                        "--start=café"],
        "no ckpt.pt": ["--out_dir=out-empty"],
        "no directory": ["--out_dir=out-nowhere"],
        "shipped": ["--num_samples=1", "--max_new_tokens=5"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(lambda args: sample_py(*args, cwd=checkout),
                                       runs.values())))


def test_readme_command_loads_the_out_dir(checkout, workflow_runs):
    code, out, err = workflow_runs["readme"]
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0] == loaded_line(checkout, "out-shakespeare-char")
    assert re.fullmatch(r"generated 40 tokens in .*", lines[1])
    # the same model as --init_from=resume, and characters of its vocabulary only
    assert out == workflow_runs["resume"][1]
    texts = out.split("\n" + SEPARATOR + "\n")[:-1]
    assert len(texts) == 2 and all(len(t) == 21 and set(t) <= set(CHARS) for t in texts)


def test_training_config_as_first_argument(checkout, workflow_runs):
    code, out, err = workflow_runs["training config"]
    assert code == 0, err
    note, loaded, speed = err.splitlines()
    assert note == (
        f"note: ignored nanoGPT training settings (from {NANOGPT_CONFIGS}/train_shakespeare_char.py): "
        "eval_interval, eval_iters, log_interval, always_save_checkpoint, wandb_log, "
        "wandb_project, wandb_run_name, dataset, gradient_accumulation_steps, batch_size, "
        "block_size, n_layer, n_head, n_embd, dropout, learning_rate, max_iters, "
        "lr_decay_iters, min_lr, beta2, warmup_iters")
    assert loaded == loaded_line(checkout, "out-shakespeare-char")
    assert speed.startswith("generated 40 tokens")
    assert out == workflow_runs["readme"][1]  # its out_dir, the model it trained


@pytest.mark.parametrize("run, message", [
    # the note on ignored settings comes with the loaded line: a mistake is still one line
    ("training config, bad prompt", "error: --start: character 'é' (position 3 of the text) is "
                                    "not in this model's"),
    ("no ckpt.pt", "error: --out_dir=out-empty: no ckpt.pt in it; out_dir is the folder where "
                   "nanoGPT's train.py saved ckpt.pt"),
    ("no directory", "error: --out_dir=out-nowhere: no such directory; out_dir is the folder "
                     "where nanoGPT's train.py saved ckpt.pt"),
])
def test_mistakes_are_one_error_line(workflow_runs, run, message):
    code, out, err = workflow_runs[run]
    assert (code, out, len(err.splitlines())) == (2, "", 1)
    assert err.startswith(message)


def test_without_out_dir_or_init_from_the_shipped_model_loads(workflow_runs):
    code, out, err = workflow_runs["shipped"]
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"loaded .*checkpoints/shakespeare_char \(nanosample checkpoint\): "
                        r"[\d.]+M parameters, vocabulary 65, block_size \d+, float32 on cpu",
                        lines[0]), lines[0]


def test_loaded_line_of_a_padded_gpt2_vocabulary(checkout):
    from sample import describe_loaded

    loaded = loader.load_model(str(checkout / "out-owt"))
    n = loaded.model.num_params()
    assert describe_loaded(loaded) == (
        f"loaded {checkout}/out-owt/ckpt.pt (nanoGPT checkpoint): {n / 1e6:.2f}M parameters, "
        f"vocabulary 50257 (padded to 50304), block_size {BLOCK}, float32 on cpu")


def test_out_dir_from_a_config_file_means_resume(checkout, tmp_path):
    from sample import model_to_load

    own = tmp_path / "mine.py"
    own.write_text("out_dir = 'out-empty'\n")
    with pytest.raises(SettingsError, match=re.escape(
            f"{own}:1: out_dir='out-empty': no ckpt.pt in it")):
        cwd = os.getcwd()
        os.chdir(checkout)
        try:
            model_to_load(read_settings(SampleSettings, [str(own)]))
        finally:
            os.chdir(cwd)
    # a flag --init_from wins over any out_dir; without either, the shipped model
    assert model_to_load(read_settings(SampleSettings, [str(own), "--init_from=gpt2"])) == "gpt2"
    assert model_to_load(read_settings(SampleSettings, [])) == "shakespeare_char"


# ---------------------------------------------------------------------------------------------
# nanoGPT's config files, parsed (never run)

@pytest.mark.parametrize("name, init_from, out_dir, ignored", [
    ("train_shakespeare_char.py", "resume", "out-shakespeare-char", 21),
    ("train_gpt2.py", "resume", "out", 12),  # trains into nanoGPT's default out_dir
    ("finetune_shakespeare.py", "resume", "out-shakespeare", 13),  # not gpt2-xl, where it began
    ("eval_gpt2.py", "gpt2", "out", 4),  # evaluates gpt2, trains nothing
])
def test_nanogpt_config_files(name, init_from, out_dir, ignored):
    parsed = read_settings(SampleSettings, [str(NANOGPT_CONFIGS / name)])
    assert (parsed.settings.init_from, parsed.settings.out_dir) == (init_from, out_dir)
    assert len(parsed.ignored) == ignored
    assert parsed.settings.batch_size is None  # their micro-batch is not our memory cap
    assert "init_from" in parsed.sources


def test_finetune_config_lists_its_init_from_and_computed_value_as_ignored():
    parsed = read_settings(SampleSettings, [str(NANOGPT_CONFIGS / "finetune_shakespeare.py")])
    assert list(parsed.ignored) == [
        "eval_interval", "eval_iters", "wandb_log", "wandb_project", "wandb_run_name", "dataset",
        "init_from", "always_save_checkpoint", "batch_size", "gradient_accumulation_steps",
        "max_iters", "learning_rate", "decay_lr"]


def test_nanogpt_config_keys_that_are_nobodys_fail_with_the_closest_name(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("dataset = 'shakespeare_char'\neval_intervall = 250\n")
    with pytest.raises(SettingsError) as e:
        read_settings(SampleSettings, [str(path)])
    assert str(e.value) == f"{path}:2: unknown key 'eval_intervall'; did you mean 'eval_interval'?"


def test_nanogpt_config_expressions_are_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "mine.py"
    # an expression for an ignored key stays unevaluated; for one of ours it is an error
    path.write_text(f"import os\ndataset = 'x'\nwandb_run_name = os.system('touch {marker}')\n")
    assert read_settings(SampleSettings, [str(path)]).ignored == \
        {"dataset": str(path), "wandb_run_name": str(path)}
    path.write_text(f"import os\ndataset = 'x'\nout_dir = os.system('touch {marker}')\n")
    with pytest.raises(SettingsError, match=f"^{path}:3: out_dir: the value must be a literal"):
        read_settings(SampleSettings, [str(path)])
    assert not marker.exists()


def test_a_flag_beats_a_nanogpt_config():
    parsed = read_settings(SampleSettings, [str(NANOGPT_CONFIGS / "train_shakespeare_char.py"),
                                            "--out_dir=elsewhere", "--batch_size=4"])
    assert (parsed.settings.out_dir, parsed.settings.batch_size) == ("elsewhere", 4)


@pytest.mark.parametrize("flag", ["--top_p=0.9", "--min_p=0.1", "--repetition_penalty=1.2",
                                  "--ban=3", "--logit_bias=3:1"])
def test_nanogpts_draw_has_temperature_and_top_k_only(flag):
    name = flag[2:].split("=")[0]
    with pytest.raises(SettingsError, match=re.escape(
            f": --draw=multinomial is nanoGPT's sampler (temperature and top_k only); "
            f"{name} needs --draw=inverse_cdf")):
        read_settings(SampleSettings, ["--draw=multinomial", flag])


def test_nanogpt_toml():
    s = read_settings(SampleSettings, [NANOGPT_TOML]).settings
    assert (s.draw, s.context, s.stop_at_eot, s.start, s.num_samples, s.max_new_tokens,
            s.temperature, s.top_k, s.seed) == ("multinomial", "crop", False, "\n", 10, 500, 0.8,
                                               200, 1337)
