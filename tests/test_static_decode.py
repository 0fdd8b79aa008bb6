"""static_decode.py on the CPU: the fixed-shape decode step equals the readable one.

The CUDA graph itself needs a GPU (bench_gpu.py checks it there); what it replays is
`static_step`, run here uncaptured (decode_step="static"): its logits against model.forward's
within float32 rounding, its greedy and sampled tokens identical, across the "half" context's
recomputations, with and without the CPU's oneDNN products. Also which step "auto" picks, and
the --cuda_graph setting's errors.
"""

import types

import pytest
import torch

import conftest
from conftest import CHARS, run_generate as run
from nanosample import generate as generate_module
from nanosample import static_decode
from nanosample.cpu_kernels import use_cpu_kernels
from nanosample.model import GPT, GPTConfig, KVCache
from nanosample.sampling import SamplingParams
from nanosample.settings import SampleSettings, SettingsError, parse_settings
from nanosample.static_decode import StaticDecoder, choose_decode_step


def tiny_model(block_size=96, vocab_size=64, cpu_kernels=False, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                          n_embd=32)).eval()
    return use_cpu_kernels(model) if cpu_kernels else model


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["F.linear", "oneDNN"])
@pytest.mark.parametrize("batch", [1, 4])
@torch.no_grad()
def test_static_step_is_the_eager_step(batch, cpu_kernels):
    """64 steps fed to model.forward and to the static step side by side: the logits agree
    within float32 rounding at every step, their greedy tokens are the same, and so are the
    caches. The tokens fed are random, not the greedy ones: a random tiny model's greedy
    text repeats one token, which would test one input 64 times."""
    model = tiny_model(cpu_kernels=cpu_kernels)
    steps, max_len = 64, 80
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, 64, (batch, 9), generator=g)
    fed = torch.randint(0, 64, (steps, batch, 1), generator=g)
    eager_cache = KVCache(model.config, batch, max_len=max_len)
    static_cache = KVCache(model.config, batch, max_len=max_len)
    eager = [model(prompt, cache=eager_cache, last_only=True)[:, -1]]  # (B, V) each
    model(prompt, cache=static_cache)
    decoder = StaticDecoder(model, static_cache, capture=False)
    static = [eager[0]]
    for tokens in fed:
        eager.append(model(tokens, cache=eager_cache, last_only=True)[:, -1])
        static.append(decoder(tokens))
    eager, static = torch.stack(eager), torch.stack(static)  # (steps + 1, B, V)
    assert static.shape == (steps + 1, batch, 64)
    worst = (static - eager).abs().max().item()
    assert worst < 1e-5, worst
    assert torch.equal(static.argmax(-1), eager.argmax(-1))
    assert len(eager.argmax(-1).unique()) > 5  # the greedy choices do vary
    assert static_cache.pos == eager_cache.pos == 9 + steps
    assert torch.allclose(static_cache.k, eager_cache.k, atol=1e-5)
    assert torch.allclose(static_cache.v, eager_cache.v, atol=1e-5)




@pytest.fixture
def counted(monkeypatch):
    """How many decode steps went through static_step and how many recomputations ran."""
    calls = {"static": 0, "recompute": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(static_decode, "static_step",
                        counting("static", static_decode.static_step))
    monkeypatch.setattr(generate_module, "_recompute",
                        counting("recompute", generate_module._recompute))
    return calls


def per_sample_recomputes(prompt_len, fed, block_size):
    """How often the "half" rule recomputes the context while `fed` tokens are fed back."""
    start, count = 0, 0
    for length in range(prompt_len + 1, prompt_len + fed + 1):
        new_start = generate_module.context_start(length, start, block_size)
        count += new_start != start
        start = new_start
    return count


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["F.linear", "oneDNN"])
@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0),
                                    SamplingParams(temperature=0.9, top_k=12, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_generate_with_the_static_step_past_block_size(num_samples, params, cpu_kernels,
                                                       counted):
    """block_size 24, a 5-character prompt and 64 new tokens: the context is recomputed
    (eagerly) several times and the static step goes on from there; the text is eager's."""
    model = tiny_model(block_size=24, vocab_size=32, cpu_kernels=cpu_kernels)
    tokenizer = conftest.CharTokenizer(CHARS)
    common = dict(params=params, num_samples=num_samples, max_new_tokens=64, seed=5)
    recomputes = per_sample_recomputes(prompt_len=5, fed=63, block_size=24)
    assert recomputes == 4
    eager = run(model, tokenizer, "the k", decode_step="eager", **common)
    assert counted == {"static": 0, "recompute": recomputes}
    static = run(model, tokenizer, "the k", decode_step="static", **common)
    # every decode step but the recomputations went through the static step
    assert counted == {"static": 63 - recomputes, "recompute": 2 * recomputes}
    assert static == eager
    assert all(reason == "length" and len(tokens) == 64 for _, reason, tokens in eager.values())


def test_auto_is_eager_on_the_cpu(counted):
    model = tiny_model()
    tokenizer = conftest.CharTokenizer(CHARS)
    run(model, tokenizer, "the ", params=SamplingParams(temperature=0), max_new_tokens=8)
    assert counted["static"] == 0


def test_which_step_auto_chooses():
    def fake(device, compiled=False):  # only what choose_decode_step reads of a model
        weight = types.SimpleNamespace(device=torch.device(device))
        model = types.SimpleNamespace(transformer=types.SimpleNamespace(
            wte=types.SimpleNamespace(weight=weight)))
        if compiled:
            model._orig_mod = object()  # what torch.compile's wrapper has
        return model

    cuda = fake("cuda")
    assert choose_decode_step(cuda, 1, "half") == "graph"
    assert choose_decode_step(cuda, 64, "half") == "graph"
    assert choose_decode_step(cuda, 65, "half") == "eager"
    assert choose_decode_step(cuda, 8, "crop") == "eager"
    assert choose_decode_step(fake("cuda", compiled=True), 8, "half") == "eager"
    assert choose_decode_step(fake("cpu"), 8, "half") == "eager"
    assert choose_decode_step(fake("mps"), 8, "half") == "eager"
    assert choose_decode_step(fake("cpu"), 8, "half", "static") == "static"
    assert choose_decode_step(cuda, 100, "crop", "graph") == "graph"  # asked for: given
    with pytest.raises(AssertionError):
        choose_decode_step(cuda, 8, "half", "compiled")


def test_a_graph_needs_cuda():
    model = tiny_model()
    with pytest.raises(AssertionError, match="CUDA"):
        StaticDecoder(model, KVCache(model.config, 1, max_len=8), capture=True)


# ---------------------------------------------------------------------------------------------
# --cuda_graph

def test_cuda_graph_setting():
    assert SampleSettings().cuda_graph is None
    assert parse_settings(SampleSettings, ["--cuda_graph=false"]).cuda_graph is False
    assert parse_settings(SampleSettings, ["--cuda_graph"]).cuda_graph is True
    with pytest.raises(SettingsError, match=r"^--cuda_graph=true: cannot be combined with "
                                            r"--compile"):
        parse_settings(SampleSettings, ["--cuda_graph=true", "--compile"])
    with pytest.raises(SettingsError, match=r"^--cuda_graph=true: needs --context=half"):
        parse_settings(SampleSettings, ["--cuda_graph=true", "--context=crop"])
    # asked for off, or left to auto, it combines with anything
    assert parse_settings(SampleSettings, ["--cuda_graph=false", "--compile"]).compile
    assert parse_settings(SampleSettings, ["--context=crop"]).cuda_graph is None


def test_sample_py_refuses_a_cuda_graph_on_the_cpu(tmp_path):
    config = tmp_path / "gpu.toml"
    config.write_text("cuda_graph = true\n")
    code, out, err = conftest.sample_py("--device=cpu", "--cuda_graph=true",
                                        "--max_new_tokens=3")
    assert code == 2 and out == ""
    assert err.startswith("error: --cuda_graph=true: CUDA graphs need a CUDA device, and this "
                          "run is on cpu (--device=cpu)")
    assert len(err.strip().splitlines()) == 1
    code, out, err = conftest.sample_py(str(config), "--device=cpu", "--max_new_tokens=3")
    assert code == 2 and err.startswith(f"error: {config}: cuda_graph=true: CUDA graphs need")


# ---------------------------------------------------------------------------------------------
# bench_gpu.py, the GPU check: what can be checked without a GPU

def test_bench_gpu_judges_differences():
    import bench_gpu

    mask = torch.tensor([[False, False, True, True], [False, True, False, False],
                         [False, False, False, False]])
    assert bench_gpu._first(mask) == (1, 1)
    assert bench_gpu._first(mask[[0, 2]]) == (0, 2)
    row = {"graph_vs_static": 0.0, "graph_vs_eager": 0.01,
           "first_difference": {"row": 3, "step": 40, "eager_top2_gap": 0.03}}
    bench_gpu._judge(row, "bfloat16", 8)  # a near tie: reported, not judged
    with pytest.raises(bench_gpu.CheckFailed, match=r"^float32, batch 8: the graph's logits "
                                                    r"differ from eager's by 0.01, more"):
        bench_gpu._judge(row, "float32", 8)
    bench_gpu._judge(dict(row, graph_vs_eager=1e-5), "float32", 8)
    with pytest.raises(bench_gpu.CheckFailed, match="from the uncaptured static step's by 2"):
        bench_gpu._judge(dict(row, graph_vs_static=2.0), "bfloat16", 8)
    with pytest.raises(bench_gpu.CheckFailed, match="from eager's by 0.6"):
        bench_gpu._judge(dict(row, graph_vs_eager=0.6), "bfloat16", 8)


def test_bench_gpu_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = conftest.run_python("bench_gpu.py")
    assert code == 2 and out == ""
    assert err.startswith("error: --device=cuda: CUDA is not available here")
    assert "--dry_run" in err
    code, out, err = conftest.run_python("bench_gpu.py", "--device=cpu")
    assert code == 2 and err.startswith("error: --device=cpu: must be cuda or cuda:N")


@pytest.mark.slow
def test_bench_gpu_dry_run(tmp_path):
    """Every path of the GPU check but the capture, on a tiny model on the CPU (a minute or
    two on a busy machine)."""
    import json

    code, out, err = conftest.run_python("bench_gpu.py", "--dry_run",
                                         f"--out={tmp_path / 'gpu.json'}", timeout=600)
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "gpu.json").read_text())
    assert report["ok"] and report["dry_run"]
    assert report["recompute"] == {name: {"graph_equals_static": True, "graph_equals_eager": True}
                                   for name in ("greedy", "sampled")}
    assert report["greedy_identical_to_eager"] is True
    for batch in ("1", "4"):
        row = report["correctness"]["float32"][batch]
        assert row["graph_equals_static_bitwise"] and row["rows_identical_to_eager"] == int(batch)
        assert row["graph_vs_eager"] < 1e-5
    assert [(r["batch"], r["sampler"]) for r in report["speed"]] == \
        [(1, "greedy"), (1, "top_k"), (4, "greedy"), (4, "top_k")]
    assert all(r["systems"]["hf"]["tokens_per_s"] > 0 for r in report["speed"])
