"""--quantize: fp16, bf16 and int8 weights in the CPU products (nanosample/quantize.py).

What is held: each reduced product is close to the float64 product within its format's error
and is not the float32 product (the mode really runs); a quantized model keeps its greedy text
close to float32's, on the shipped model at the agreement the README states; the run is
repeatable for a fixed batch size; float32 (the default) is untouched; the flag's errors.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

import bench
from conftest import sample_py
from nanosample import quantize as q
from nanosample.loader import load_model
from nanosample.model import GPT, GPTConfig
from nanosample.settings import QUANTIZE_MODES

REDUCED = ("fp16", "bf16", "int8")
pytestmark = pytest.mark.skipif(any(q.check_available(m) for m in REDUCED),
                                reason="this torch has no FBGEMM kernels (not an x86 build)")

# Largest error of a product against float64, relative to the output's RMS, with margin: fp16
# rounds weights to 11 significant bits, bf16 weights and inputs to 8, int8 weights to 127
# levels per row and inputs to 256 levels per call (measured ~0.0005, ~0.01, ~0.05).
RELATIVE_ERROR = {"fp16": 0.005, "bf16": 0.05, "int8": 0.25}


def test_modes_match_the_settings_list():
    assert q.MODES == QUANTIZE_MODES


@pytest.mark.parametrize("mode", REDUCED)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_reduced_product_is_close_to_the_exact_one_and_not_float32s(mode, rows):
    torch.manual_seed(0)
    layer = nn.Linear(192, 96)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.normal_(layer.bias, std=0.02)
    x = torch.randn(rows, 192)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())   # (rows, 96)
    y = q.LAYERS[mode](layer)(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    rms = exact.pow(2).mean().sqrt()
    error = (y.double() - exact).abs().max() / rms
    assert error < RELATIVE_ERROR[mode]
    assert not torch.equal(y, F.linear(x, layer.weight, layer.bias))  # it did not run float32


def test_quantize_swaps_every_product_and_keeps_the_embedding_float32():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()
    wte = model.transformer.wte.weight.clone()
    q.quantize(model, "int8")
    kinds = {type(m) for m in model.modules()}
    assert nn.Linear not in kinds and q.Int8Linear in kinds
    assert isinstance(model.lm_head, q.Int8Linear)
    assert torch.equal(model.transformer.wte.weight, wte)  # the lookup table is not rounded
    assert model.transformer.wte.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", REDUCED)
def test_a_quantized_model_greedy_decodes_like_float32(mode):
    """A random 4-layer model with peaked rows (its final LayerNorm scaled as bench.py's
    fidelity check does): the reduced model's top token is float32's at >= 90% of 64 steps,
    and the KL divergence is small. A model that rounds nothing would show agreement 1 and
    KL 0 (checked in the next test), so this is the reduced path's own measurement."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=80, vocab_size=500, n_layer=4, n_head=4, n_embd=64)).eval()
    model.transformer.ln_f.weight = nn.Parameter(model.transformer.ln_f.weight * 40)
    reduced = q.quantize(copy.deepcopy(model), mode)
    result = bench.greedy_fidelity(model, reduced, [1, 2, 3], steps=64)
    assert result["agreement"] >= 0.9
    assert 0 < result["kl"] < 0.05
    assert 0.2 < result["top1_prob"] < 1


def test_greedy_fidelity_of_a_model_with_itself_is_perfect():
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=40, vocab_size=60, n_layer=1, n_head=2, n_embd=16)).eval()
    result = bench.greedy_fidelity(model, model, [5], steps=32)
    assert result == {"agreement": 1.0, "kl": 0.0, "top1_prob": pytest.approx(result["top1_prob"]),
                      "identical_tokens": 32}
    other = copy.deepcopy(model)
    other.lm_head.weight = nn.Parameter(torch.randn_like(other.lm_head.weight))
    assert bench.greedy_fidelity(model, other, [5], steps=32)["agreement"] < 0.5


@pytest.mark.parametrize("mode", REDUCED)
def test_the_shipped_model_keeps_its_greedy_text(mode):
    """The README's fidelity figures, held: on checkpoints/shakespeare_char, over 256 greedy
    tokens from two prompts, the reduced model's top token is float32's at >= 99% of the
    steps for fp16/bf16 and >= 97% for int8 (issue 13's goals), with a small KL."""
    fp32 = load_model("shakespeare_char")
    reference, tokenizer = fp32.model, fp32.tokenizer
    reduced = load_model("shakespeare_char", quantize=mode).model
    runs = [bench.greedy_fidelity(reference, reduced, tokenizer.encode(c), steps=256)
            for c in ("\n", "R")]
    agreement = sum(r["agreement"] for r in runs) / len(runs)
    assert agreement >= bench.FIDELITY_GOALS[mode]
    assert all(r["kl"] < 0.02 for r in runs)


def test_load_model_keeps_the_parameter_count_and_the_mode():
    fp32 = load_model("shakespeare_char")
    int8 = load_model("shakespeare_char", quantize="int8")
    assert int8.info["parameters"] == fp32.info["parameters"] == fp32.model.num_params()
    assert int8.info["quantize"] == "int8" and "quantize" not in fp32.info


def test_sample_py_int8_is_repeatable_and_says_so():
    args = ("--init_from=shakespeare_char", "--quantize=int8", "--num_samples=3",
            "--max_new_tokens=40", "--seed=7")
    first, second = sample_py(*args), sample_py(*args)
    assert first[0] == 0 and first[1] == second[1]
    assert "int8 weights in the matrix products" in first[2]
    fp32 = sample_py(*args[:1], *args[2:])
    assert fp32[0] == 0 and "weights in the matrix products" not in fp32[2]


@pytest.mark.parametrize("args, message", [
    (["--quantize=int4"], "error: --quantize=int4: must be none, fp16, bf16 or int8"),
    (["--quantize=int8", "--dtype=bfloat16", "--device=cpu"],
     "error: --quantize=int8: needs --dtype=float32 (or auto), not bfloat16"),
    (["--quantize=fp16", "--compile"], "error: --quantize=fp16: cannot be combined with --compile"),
])
def test_bad_quantize_flags_are_one_line_errors(args, message):
    code, out, err = sample_py("--init_from=shakespeare_char", "--max_new_tokens=1", *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_a_bad_quantize_in_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "q.toml"
    config.write_text('quantize = "int2"\n')
    code, out, err = sample_py(str(config), "--init_from=shakespeare_char")
    assert code == 2 and out == ""
    assert str(config) in err and "quantize" in err and "none, fp16, bf16 or int8" in err
    assert err.count("\n") == 1


def test_quantize_with_a_reduced_dtype_from_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "q.toml"
    config.write_text('quantize = "fp16"\ndtype = "float16"\ndevice = "cpu"\n')
    code, out, err = sample_py(str(config), "--init_from=shakespeare_char")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {config}: quantize=fp16: needs --dtype=float32")
    assert err.count("\n") == 1


def test_quantize_on_a_gpu_device_is_refused():
    from nanosample.device import check_quantize
    from nanosample.settings import SettingsError

    with pytest.raises(SettingsError, match=r"--quantize=int8: .*CPU only.*cuda"):
        check_quantize("int8", "cuda", "bfloat16")
    check_quantize("none", "cuda", "bfloat16")  # the default asks nothing of the device

