"""train.py: a few steps of a tiny model end to end, the pieces of the recipe, and the shipped model."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nanosample import loader
import train
from nanosample import corpus
from nanosample.settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "shakespeare_char"
RECIPE = ROOT / "configs" / "train_shakespeare_char.toml"
# tiny Shakespeare beside the clone (../shared), where the project's machines keep it
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

# A small corpus with structure to learn: 47 characters, repeated with variations.
VERSE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
         "First Citizen:\nYou are all resolved rather to die than to famish?\n\n")


def tiny_settings(tmp_path, **overrides):
    text = "".join(VERSE.replace("First", word) for word in ("First", "Second", "Third") * 8)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    values = dict(data=str(corpus), out_dir=str(tmp_path / "ckpt"), n_layer=2, n_head=2,
                  n_embd=32, block_size=32, batch_size=8, max_iters=40, warmup_iters=5,
                  learning_rate=1e-2, min_lr=1e-3, weight_decay=0.1, threads=1,
                  log_interval=10, eval_interval=20, eval_iters=2, final_eval_batches=4,
                  final_eval_batch_size=8, train_eval_batches=2)
    values.update(overrides)
    return train.TrainSettings(**values), text


def test_tiny_run_learns_and_saves_a_checkpoint_that_loads(tmp_path, capsys):
    settings, text = tiny_settings(tmp_path)
    model, record = train.train(settings)
    out = capsys.readouterr().out

    # the logged training loss falls from about ln(vocab) (a uniform guess)
    losses = [float(x) for x in re.findall(r"/40  train loss (\d+\.\d+)", out)]
    assert len(losses) == 4  # every 10 of 40 steps
    vocab = len(set(text))
    assert abs(losses[0] - math.log(vocab)) < 0.6
    assert losses[-1] < losses[0] - 1.0
    assert record["val_loss"] < math.log(vocab) - 1.0
    assert record["steps"] == 40 and record["parameters"] == model.num_params()
    assert record["recipe"]["n_embd"] == 32 and record["torch_version"] == torch.__version__
    assert record["val_history"][0]["step"] == 20

    loaded = loader.load_model(settings.out_dir)
    assert loaded.tokenizer.chars == sorted(set(text))
    assert loaded.model.config == model.config
    assert loaded.info["training"]["val_loss"] == record["val_loss"]
    idx = torch.tensor([loaded.tokenizer.encode("Speak, speak.\nAll:")])  # (1, 18)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), model(idx))  # float32 saved, float32 loaded


def test_same_seed_same_model(tmp_path):
    settings, _ = tiny_settings(tmp_path, max_iters=8, eval_interval=0, log_interval=4)
    first, _ = train.train(settings)
    second, _ = train.train(replace(settings, out_dir=str(tmp_path / "again")))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_main_exit_codes(tmp_path, capsys):
    settings, _ = tiny_settings(tmp_path, max_iters=6, eval_interval=0, log_interval=3)
    argv = [f"--{k}={v}" for k, v in vars(settings).items()]
    assert train.main(argv) == 0
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    capsys.readouterr()

    assert train.main(["--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --data={tmp_path / 'missing.txt'}: ")
    assert train.main(["--n_layr=3"]) == 2
    assert "did you mean --n_layer?" in capsys.readouterr().err
    assert train.main(["--n_head=5"]) == 2
    assert capsys.readouterr().err == "error: --n_head=5: must divide n_embd=192\n"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert train.main([f"--data={tmp_path / 'latin1.txt'}"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_recipe_file_is_the_default_recipe():
    assert parse_settings(train.TrainSettings, [str(RECIPE)]) == train.TrainSettings()


def test_learning_rate_warms_up_then_decays_to_min_lr():
    s = train.TrainSettings(max_iters=1100, warmup_iters=100, learning_rate=1e-3, min_lr=1e-4)
    assert train.lr_at(0, s) == pytest.approx(1e-5)
    assert train.lr_at(99, s) == pytest.approx(1e-3)
    assert train.lr_at(600, s) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert train.lr_at(1100, s) == pytest.approx(1e-4)


def test_split_is_nanogpts_and_batches_are_shifted_by_one():
    ids = torch.arange(1000)
    tr, va = train.split_corpus(ids, 0.1, block_size=8)
    assert len(tr) == 900 and va[0].item() == 900  # the last 10 % validates
    x, y = train.get_batch(va, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1) and x.min() >= 900 and y.max() <= 999
    with pytest.raises(ValueError, match="block_size=200"):
        train.split_corpus(ids, 0.1, block_size=200)


def test_download_refuses_a_wrong_file_and_reports_network_errors(tmp_path, monkeypatch):
    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"not Shakespeare"

    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: FakeResponse())
    with pytest.raises(ValueError, match="sha256"):
        corpus.download_tiny_shakespeare(tmp_path)
    assert not list((tmp_path / "tinyshakespeare").iterdir())  # nothing half-written is cached

    def offline(url, timeout):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    with pytest.raises(ValueError, match="--data=PATH"):
        corpus.download_tiny_shakespeare(tmp_path)

    cached = tmp_path / "tinyshakespeare" / "input.txt"
    cached.write_text("cached", encoding="utf-8")
    assert corpus.download_tiny_shakespeare(tmp_path) == cached  # no network once cached


def test_shipped_model_loads_is_small_and_reached_its_target():
    files = [SHIPPED / "model.safetensors", SHIPPED / "config.json"]
    assert sum(f.stat().st_size for f in files) <= 20_000_000
    config = json.loads((SHIPPED / "config.json").read_text(encoding="utf-8"))
    training = config["training"]
    assert training["val_loss"] <= 1.50
    assert training["val_loss_stderr"] < 0.005  # the figure is stable to well within +-0.01
    # 45 minutes of these 2 cores: the CPU time spent over the cores used. The recorded wall
    # time also counts the waits while other programs held the shared cores.
    assert training["train_cpu_minutes"] / training["threads"] <= 45

    loaded = loader.load_model("shakespeare_char")
    assert loaded.tokenizer.n_vocab == 65
    assert loaded.model.num_params() == training["parameters"]
    if not CORPUS.is_file():
        return  # recomputing the figure needs the corpus
    text = CORPUS.read_text(encoding="utf-8")
    assert loaded.tokenizer.chars == sorted(set(text))
    ids = torch.tensor(loaded.tokenizer.encode(text))
    _, val = train.split_corpus(ids, 0.1, loaded.model.config.block_size)
    # 2 batches of 32 random windows, drawn as the recorded figure's were (fixed seed, so the
    # result is the same every run). One window's loss has a standard deviation of ~0.22, the
    # mean of 64 of them ~0.03 around the recorded figure: +-0.08 is about 3 sigma.
    val_loss, _ = train.estimate_loss(loaded.model, val, batches=2, batch_size=32,
                                      block_size=loaded.model.config.block_size,
                                      seed=training["recipe"]["seed"] + train.VAL_SEED_OFFSET)
    assert abs(val_loss - training["val_loss"]) < 0.08
