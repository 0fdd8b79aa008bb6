"""Trains the shipped character-level model on tiny Shakespeare, on the CPU.

    python train.py configs/train_shakespeare_char.toml --data=path/to/input.txt

Owns the training recipe (`TrainSettings`), the corpus (a local file, or tiny Shakespeare
downloaded once into a cache), nanoGPT's split (the first 90 % trains, the last 10 %
validates), the loop (AdamW, linear warm-up then cosine decay, gradient clipping, optional
bfloat16 autocast), the final validation figure, and the checkpoint it writes with
`loader.save_native`: model.safetensors + config.json, whose "training" entry records the
recipe and its results. Everything is seeded: one run on one machine is repeatable.

Before the first step, everything that could waste the run is checked: the values (finite,
in range), the corpus (a regular UTF-8 file of at most 64 MiB), --out_dir (it can be written,
and it holds no checkpoint unless --overwrite is given: the shipped model is never replaced by
accident), and the memory the run needs (weights, AdamW's state, the activations of a batch).
A loss that stops being finite ends the run with one line, and nothing is saved.

Exit codes (nanosample/cli.py): 2 for a mistake found before training (one `error:` line), 1
for a run that fails midway (the loss became NaN or inf, the checkpoint could not be written),
130 for Ctrl-C (nothing is saved). torch is imported only once the flags are known to be good.
"""

import hashlib
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

from nanosample import cli
from nanosample.corpus import read_corpus
from nanosample.settings import SettingsError, parse_for_main, setting

VAL_SEED_OFFSET = 1  # the validation windows come from their own generator, never the train one


@dataclass(frozen=True)
class TrainSettings:
    """Everything train.py reads; the defaults are the shipped model's recipe."""
    # data
    data: str = setting("", "the corpus, a UTF-8 text file; empty: tiny Shakespeare, "
                            "downloaded once into ~/.cache/nanosample")
    val_fraction: float = setting(0.1, "the last this much of the corpus validates (nanoGPT's "
                                       "split: 0.1); the rest trains")
    out_dir: str = setting("out-shakespeare-char",
                           "where the checkpoint (model.safetensors + config.json) is written "
                           "(nanoGPT's name; the shipped model, checkpoints/shakespeare_char, is "
                           "replaced only by naming it and adding --overwrite)")
    overwrite: bool = setting(False, "replace a checkpoint already in --out_dir (by default "
                                     "that is an error, found before training)")
    # the model (model.py's GPTConfig; vocab_size is the corpus' character count)
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads per block")
    n_embd: int = setting(192, "width of the residual stream (a multiple of n_head)")
    block_size: int = setting(256, "context length in characters")
    bias: bool = setting(False, "biases in Linear and LayerNorm (without: a little faster, "
                                "no worse, as nanoGPT trains)")
    gelu: str = setting("tanh", "tanh (GPT-2's approximation) or exact")
    # optimisation
    batch_size: int = setting(32, "sequences per step")
    max_iters: int = setting(2400, "optimiser steps")
    learning_rate: float = setting(2e-3, "peak learning rate, reached after the warm-up")
    min_lr: float = setting(2e-4, "the cosine decay ends here, at max_iters")
    warmup_iters: int = setting(100, "steps of linear warm-up from 0")
    weight_decay: float = setting(1.0, "AdamW's decoupled weight decay on matrices and "
                                       "embeddings (never gains). model.py has no dropout, so "
                                       "this is the regulariser: at 0.1 the validation loss "
                                       "bottoms out near 1.51 at ~1800 steps, then climbs")
    beta1: float = setting(0.9, "AdamW's beta1")
    beta2: float = setting(0.99, "AdamW's beta2 (0.99 as nanoGPT's shakespeare_char: few "
                                 "tokens per step)")
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this; 0 = off")
    autocast: str = setting("bfloat16", "bfloat16: matmuls under CPU autocast (about 1.5x "
                                        "faster here, same loss); none: all float32")
    # bookkeeping
    seed: int = setting(1337, "seeds the initialisation and the training windows")
    threads: int = setting(2, "torch.set_num_threads")
    log_interval: int = setting(50, "steps between train-loss lines")
    eval_interval: int = setting(300, "steps between validation estimates; 0 = only the final one")
    eval_iters: int = setting(10, "batches per validation estimate during training")
    final_eval_batches: int = setting(200, "random windows are drawn in this many batches for "
                                           "the final validation figure")
    final_eval_batch_size: int = setting(64, "sequences per batch of the final validation figure")
    train_eval_batches: int = setting(40, "batches of the final training-split loss (to show "
                                          "the gap to validation)")

    def __post_init__(self):
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                    "threads", "log_interval", "eval_iters", "final_eval_batches",
                    "final_eval_batch_size", "train_eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head}: must divide n_embd={self.n_embd}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}: must be > 0 and < 1")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu={self.gelu!r}: must be 'tanh' or 'exact'")
        if self.autocast not in ("bfloat16", "none"):
            raise ValueError(f"autocast={self.autocast!r}: must be 'bfloat16' or 'none'")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)):  # inf trains to NaN; NaN compares False
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number")
        if not 0 < self.learning_rate <= 10:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0 and <= 10")
        if not 0 < self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr}: must be > 0 and <= learning_rate")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 and < 1")
        for name in ("warmup_iters", "eval_interval", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.warmup_iters >= self.max_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters}: must be < max_iters")


# ----------------------------------------------------------------------------- data

CHECKPOINT_FILES = ("model.safetensors", "config.json", "ckpt.pt")


def check_out_dir(s):
    """--out_dir: writable (or creatable), and holding no checkpoint unless --overwrite."""
    cli.check_writable_dir(s.out_dir, f"--out_dir={s.out_dir}")
    existing = [name for name in CHECKPOINT_FILES
                if os.path.lexists(os.path.join(s.out_dir, name))]
    if existing and not s.overwrite:
        raise SettingsError(f"--out_dir={s.out_dir}: holds a checkpoint ({existing[0]}); choose "
                            f"another --out_dir, or add --overwrite to replace it")


def training_bytes(s, vocab_size):
    """Memory a training step needs, estimated: the weights with their gradients and AdamW's
    two moments (4 copies of float32), and the activations autograd keeps for one batch
    (Korthikanti et al. 2022: ~34 x n_embd + 5 x n_head x block_size values per position and
    layer, counted at 4 bytes), plus the logits and their gradient."""
    params = 12 * s.n_layer * s.n_embd ** 2 + (vocab_size + s.block_size) * s.n_embd
    positions = s.batch_size * s.block_size
    activations = positions * s.n_layer * (34 * s.n_embd + 5 * s.n_head * s.block_size) * 4
    logits = 3 * positions * vocab_size * 4
    return 16 * params, activations + logits


def check_memory(s, vocab_size):
    """Refuse, before allocating, a model or a batch that cannot fit in the memory left."""
    free = cli.available_memory_bytes("cpu")
    if free is None:
        return
    weights, batch = training_bytes(s, vocab_size)
    limit = free * 0.8
    if weights > limit:
        raise SettingsError(f"--n_layer={s.n_layer}, --n_embd={s.n_embd}: the model's weights "
                            f"with their gradients and AdamW's state need about "
                            f"{cli.gib(weights)}, more than the {cli.gib(limit)} this run may use")
    if weights + batch > limit:
        fits = max(1, int(s.batch_size * (limit - weights) / batch))
        raise SettingsError(f"--batch_size={s.batch_size}: a step needs about "
                            f"{cli.gib(weights + batch)} ({s.batch_size} x {s.block_size} "
                            f"characters of activations, the weights and AdamW's state), more "
                            f"than the {cli.gib(limit)} this run may use; use "
                            f"--batch_size={fits} or less")


def split_corpus(ids, val_fraction, block_size):
    """nanoGPT's split of the encoded corpus (N,): the last `val_fraction` of it validates."""
    n = int(len(ids) * (1 - val_fraction))
    train, val = ids[:n], ids[n:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) <= block_size:
            raise ValueError(f"block_size={block_size}: the {name} split has only {len(part)} "
                             f"characters; use a longer corpus or a shorter block_size")
    return train, val


def get_batch(ids, batch_size, block_size, generator):
    """Random windows of `ids` (N,): inputs x and next-character targets y, both (B, T)."""
    import torch

    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size)  # (T,)
    x = ids[starts[:, None] + offsets]      # (B, T)
    y = ids[starts[:, None] + offsets + 1]  # (B, T)
    return x, y


# ----------------------------------------------------------------------------- training

def lr_at(step, s):
    """Linear warm-up to learning_rate, then a cosine down to min_lr at max_iters."""
    if step < s.warmup_iters:
        return s.learning_rate * (step + 1) / s.warmup_iters
    progress = (step - s.warmup_iters) / max(1, s.max_iters - s.warmup_iters)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.learning_rate - s.min_lr)


def make_optimizer(model, s):
    import torch

    # Decay the matrices and embeddings; LayerNorm gains (and any biases) are left alone.
    params = [p for p in model.parameters() if p.requires_grad]  # wte/lm_head appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2))


def compute_loss(model, x, y, autocast):
    import torch
    from torch.nn import functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
        logits = model(x)  # (B, T, V)
    # the loss in float32 even under autocast: a bfloat16 log-softmax loses digits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def estimate_loss(model, ids, batches, batch_size, block_size, seed, autocast="none"):
    """(mean, standard error) of the loss over `batches` random windows drawn with `seed`.

    The same seed gives the same windows, so estimates during a run compare like with like.
    """
    import torch

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = torch.empty(batches)
    with torch.no_grad():
        for i in range(batches):
            x, y = get_batch(ids, batch_size, block_size, generator)
            losses[i] = compute_loss(model, x, y, autocast)
    model.train(was_training)
    sem = losses.std().item() / math.sqrt(batches) if batches > 1 else float("nan")
    return losses.mean().item(), sem


class TrainingFailed(Exception):
    """The run cannot go on (the loss stopped being finite): one line, exit code 1."""


def _finite_or_stop(value, what, step, lr):
    if not math.isfinite(value):
        raise TrainingFailed(f"the {what} became {value} at step {step} (learning rate "
                             f"{lr:.2e}); stopped, nothing was saved; lower --learning_rate, or "
                             f"set --grad_clip (e.g. 1.0)")


def train(s, log=print):
    """Train per `s` and write the checkpoint to s.out_dir; returns (model, its "training" record).

    Raises SettingsError for what is found before the first step (the corpus, --out_dir, the
    memory), TrainingFailed when the loss stops being finite (nothing is saved then).
    """
    text, corpus_path = read_corpus(s.data)
    chars = sorted(set(text))
    check_out_dir(s)
    check_memory(s, len(chars))
    cli.check_interrupted()  # a Ctrl-C that a library swallowed while these loaded

    tokenizer, train_ids, val_ids = _encode_corpus(s, text, chars, corpus_path, log)
    model, optimizer = _build_model(s, len(chars), log)

    start, cpu_start = time.perf_counter(), time.process_time()
    history = _train_loop(s, model, optimizer, train_ids, val_ids, start, log)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    losses = _final_losses(s, model, train_ids, val_ids)
    total_seconds = time.perf_counter() - start
    val_loss, val_sem, train_loss, train_sem = losses
    log(f"final: val loss {val_loss:.4f} +- {val_sem:.4f}, train loss {train_loss:.4f} "
        f"+- {train_sem:.4f} ({s.final_eval_batches} / {s.train_eval_batches} batches of "
        f"{s.final_eval_batch_size} x {s.block_size}, float32); trained {train_seconds / 60:.1f} min, "
        f"{total_seconds / 60:.1f} min with the final evaluation")

    record = _training_record(s, text, corpus_path, model, losses, history,
                              (train_seconds, train_cpu_seconds, total_seconds))
    _save_checkpoint(s, model, tokenizer, record)
    log(f"saved {s.out_dir}")
    return model, record


def _encode_corpus(s, text, chars, corpus_path, log):
    """Seed torch, encode the corpus one id per character, and split it (tokenizer, train, val).

    torch is imported here, not at the top: a mistake in the flags is reported before the
    second it takes to load.
    """
    import torch

    from nanosample.tokenizer import CharTokenizer

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)  # before the model is built: its initialisation is seeded
    tokenizer = CharTokenizer(chars)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    train_ids, val_ids = split_corpus(ids, s.val_fraction, s.block_size)
    log(f"corpus {corpus_path}: {len(text):,} characters, {len(chars)} distinct; "
        f"train {len(train_ids):,}, val {len(val_ids):,}")
    return tokenizer, train_ids, val_ids


def _build_model(s, vocab_size, log):
    """A freshly initialised GPT in training mode, with its AdamW optimiser."""
    from nanosample.model import GPT, GPTConfig

    config = GPTConfig(block_size=s.block_size, vocab_size=vocab_size, n_layer=s.n_layer,
                       n_head=s.n_head, n_embd=s.n_embd, bias=s.bias, gelu=s.gelu)
    model = GPT(config)
    model.train()
    optimizer = make_optimizer(model, s)
    log(f"model {model.num_params():,} parameters ({s.n_layer} layers x {s.n_embd} wide, "
        f"{s.n_head} heads, block {s.block_size}); {s.max_iters} steps of "
        f"{s.batch_size} x {s.block_size} characters, autocast {s.autocast}, {s.threads} threads")
    return model, optimizer


def _train_step(s, model, optimizer, x, y, lr):
    """One optimiser step on the batch (x, y) at learning rate `lr`; returns the loss."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = compute_loss(model, x, y, s.autocast)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    optimizer.step()
    return loss.item()


def _train_loop(s, model, optimizer, train_ids, val_ids, start, log):
    """s.max_iters steps, logging the train loss and estimating the validation loss on the way;
    returns those estimates ({"step", "val_loss", "minutes"} each) for the record."""
    import torch

    generator = torch.Generator().manual_seed(s.seed)  # the training windows
    val_seed = s.seed + VAL_SEED_OFFSET
    running = []  # the train losses since the last log line
    history = []
    for step in range(s.max_iters):
        lr = lr_at(step, s)
        x, y = get_batch(train_ids, s.batch_size, s.block_size, generator)
        running.append(_train_step(s, model, optimizer, x, y, lr))
        _finite_or_stop(running[-1], "training loss", step + 1, lr)
        cli.check_interrupted()

        done = step + 1
        if done % s.log_interval == 0 or done == s.max_iters:
            elapsed = time.perf_counter() - start
            rate = done * s.batch_size * s.block_size / elapsed
            log(f"step {done:5d}/{s.max_iters}  train loss {sum(running) / len(running):.4f}  "
                f"lr {lr:.2e}  {elapsed / 60:6.1f} min  {rate:,.0f} chars/s")
            running = []
        # the last step is skipped: the final, larger estimate follows it
        if s.eval_interval and done % s.eval_interval == 0 and done < s.max_iters:
            val, _ = estimate_loss(model, val_ids, s.eval_iters, s.batch_size, s.block_size,
                                   val_seed, s.autocast)
            elapsed = time.perf_counter() - start
            history.append({"step": done, "val_loss": round(val, 4),
                            "minutes": round(elapsed / 60, 2)})
            log(f"step {done:5d}/{s.max_iters}  val loss {val:.4f} ({s.eval_iters} batches)  "
                f"{elapsed / 60:6.1f} min")
    return history


def _final_losses(s, model, train_ids, val_ids):
    """(val loss, its standard error, train loss, its standard error) of the trained model.

    The figure that is recorded: float32 (as the saved weights load), many fixed windows; the
    training split's loss beside it shows the gap to validation.
    """
    model.eval()
    measure = dict(batches=s.final_eval_batches, batch_size=s.final_eval_batch_size,
                   block_size=s.block_size, seed=s.seed + VAL_SEED_OFFSET)
    val_loss, val_sem = estimate_loss(model, val_ids, **measure)
    train_loss, train_sem = estimate_loss(model, train_ids, **{**measure, "batches": s.train_eval_batches})
    _finite_or_stop(val_loss, "validation loss", s.max_iters, lr_at(s.max_iters - 1, s))
    _finite_or_stop(train_loss, "final training loss", s.max_iters, lr_at(s.max_iters - 1, s))
    return val_loss, val_sem, train_loss, train_sem


def _training_record(s, text, corpus_path, model, losses, history, seconds):
    """The checkpoint's "training" entry: the recipe, the corpus, the results and the machine,
    so a checkpoint says how it was made. `seconds` is (training, its CPU time, wall in all)."""
    import torch

    val_loss, val_sem, train_loss, _ = losses
    train_seconds, train_cpu_seconds, total_seconds = seconds
    return {
        "script": "train.py",
        "recipe": asdict(s),
        "corpus": {"name": corpus_path.name, "characters": len(text),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   "split": f"first {1 - s.val_fraction:.0%} train, last {s.val_fraction:.0%} val"},
        "parameters": model.num_params(),
        "steps": s.max_iters,
        "tokens_seen": s.max_iters * s.batch_size * s.block_size,
        "val_loss": round(val_loss, 4),
        "val_loss_stderr": round(val_sem, 4),
        "train_loss": round(train_loss, 4),
        "val_loss_measured": (f"mean cross-entropy (nats per character) over "
                              f"{s.final_eval_batches} batches of {s.final_eval_batch_size} random "
                              f"windows of {s.block_size} characters from the validation split, "
                              f"every position counted (as nanoGPT's estimate_loss), float32, "
                              f"window generator seeded with {s.seed + VAL_SEED_OFFSET}"),
        "val_history": history,
        "train_minutes": round(train_seconds / 60, 2),
        "train_cpu_minutes": round(train_cpu_seconds / 60, 2),  # both cores: 2x wall at best
        "wall_minutes": round(total_seconds / 60, 2),
        "torch_version": torch.__version__,
        "threads": s.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "machine": platform.processor() or platform.machine(),
    }


def _save_checkpoint(s, model, tokenizer, record):
    """Write model.safetensors + config.json to s.out_dir, or fail with one line."""
    from nanosample import loader

    try:
        loader.save_native(model, tokenizer, s.out_dir, record)
    except OSError as e:  # a full disk: save_native writes each file whole or not at all
        raise TrainingFailed(f"--out_dir={s.out_dir}: cannot write the checkpoint "
                             f"({e.strerror}); the trained model is lost") from None


DESCRIPTION = ("Train the character-level model that sample.py loads by default (tiny "
               "Shakespeare, on the CPU) and write it in the native checkpoint format. The shipped "
               "model: python train.py configs/train_shakespeare_char.toml --data=input.txt")


def main(argv=None):
    """Exit code: 0, 1 (failed midway), 2 (bad input) or 130 (interrupted), as cli.py says."""
    return cli.run_script(_main, argv, interrupted="interrupted: nothing was saved")


def _main(argv):
    settings, code = parse_for_main(TrainSettings, argv, prog="train.py", description=DESCRIPTION)
    if settings is None:
        return code
    try:
        train(settings)
    except ValueError as e:  # the corpus, --out_dir, the memory: found before the first step
        return cli.report_error(e)
    except TrainingFailed as e:
        return cli.report_error(e, cli.EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
