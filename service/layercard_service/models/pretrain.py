"""Pretrain the built-in base model (``builtin:tiny``) from scratch, deterministically, on 2 CPU cores.

    python -m layercard_service.models.pretrain --out DIR [--minutes 6] [--seed 0]

Why the project makes its own model: there is no hub access here, and the Layer Card needs a base model that
has *learned something* (a randomly initialised model has no residual structure worth diagnosing). So we train a
small Llama (8 blocks, head size 64: the shapes vLLM's CPU kernels accept) on the English text every Python
install ships (``corpus.py``), with our own byte-level BPE tokenizer, and commit the result with this script.

Determinism: the corpus order, the tokenizer, the initialisation, the batch order and the number of steps all
follow from ``--seed`` and ``--minutes``; nothing depends on the wall clock. The number of steps is
``minutes * STEPS_PER_MINUTE`` (calibrated on a 2-core machine), so ``--minutes`` is a size, not a timer.
Floating-point results are bit-reproducible only on the same CPU kind and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layercard_service.models.corpus import Corpus, Document, load_corpus

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TrainSettings",
    "encode_documents",
    "heldout_loss",
    "main",
    "model_config",
    "pretrain",
    "train_tokenizer",
    "unigram_loss",
]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
STEPS_PER_MINUTE = 80  # measured: ~0.75 s per 16x192-token step on 2 idle cores


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of the pretraining run (fixed; only seed and length are exposed on the CLI)."""

    vocab_size: int = 2048
    seq_len: int = 192  # <= max_position_embeddings (512), so serving at 512 tokens stays in range
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2  # fixed, not os.cpu_count(): the reduction order (so the weights) depends on it

    def __post_init__(self) -> None:
        if not 259 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must hold 256 bytes + 3 special tokens, got {self.vocab_size}")
        if not 1 <= self.seq_len <= 512 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("seq_len must be in 1..512, batch_size and threads >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1], warmup_steps >= 0")


def train_tokenizer(train_docs: tuple[Document, ...], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any byte string encodes, no unknown token) with ``<s>`` prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in train_docs), trainer=trainer, length=len(train_docs))
    # Llama convention: encoding a prompt prepends <s>, so vLLM and transformers see what training saw.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """8 blocks x (2 heads of 64) at width 128: ~2.2M parameters, untied embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, docs: tuple[Document, ...]) -> torch.Tensor:
    """One long token stream: <s> doc </s> <s> doc </s> ... (1-D int64)."""
    ids: list[int] = []
    # The backend tokenizer directly: the wrapper warns about documents longer than model_max_length.
    for enc in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)  # already starts with <s> (the post-processor adds it)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (n, seq_len + 1) windows that share their boundary token: full coverage for eval."""
    n = (len(stream) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over every window of ``stream``."""
    model.eval()
    win = _windows(stream, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(win), batch):
        chunk = win[i : i + batch]  # (B, T+1)
        logits = model(input_ids=chunk[:, :-1]).logits  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def unigram_loss(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab: int, seq_len: int) -> float:
    """The baseline: token frequencies from train (add-one smoothed), scored on the same targets as the model."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()  # (V,)
    targets = _windows(eval_stream, seq_len)[:, 1:].reshape(-1)
    return float(-logp[targets].mean())


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, made loadable by transformers 4.x too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (a class 4.x lacks) and no
    ``special_tokens_map.json``; "PreTrainedTokenizerFast" names the same class in both major versions.
    """
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _patch_config_for_older_readers(out: Path) -> None:
    """transformers 5 writes ``dtype`` and ``rope_parameters``; readers before 4.56 look for ``torch_dtype`` and
    ``rope_theta``. Both spellings, same values, so every reader (vLLM included) sees float32 and theta 1e4."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = cfg.get("dtype", "float32")
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the folder is shipped to other users


def _lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: LlamaForCausalLM, s: TrainSettings) -> torch.optim.AdamW:
    # Decay matrices only: decaying RMSNorm gains pulls them towards 0, which only hurts a model this small.
    decay = [p for n, p in sorted(model.named_parameters()) if p.dim() >= 2]
    no_decay = [p for n, p in sorted(model.named_parameters()) if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def pretrain(out: Path, steps: int, seed: int, s: TrainSettings | None = None) -> dict:
    """Build the corpus, tokenizer and model, train for ``steps``, evaluate, save everything into ``out``."""
    s = s or TrainSettings()
    t_start = time.perf_counter()
    torch.set_num_threads(s.threads)
    torch.manual_seed(seed)

    corpus: Corpus = load_corpus()
    print(
        f"corpus: {len(corpus.train)} train docs ({corpus.train_chars} chars), "
        f"{len(corpus.heldout)} held-out docs ({corpus.heldout_chars} chars)",
        flush=True,
    )
    tokenizer = train_tokenizer(corpus.train, s.vocab_size)
    train_stream = encode_documents(tokenizer, corpus.train)
    eval_stream = encode_documents(tokenizer, corpus.heldout)
    print(
        f"tokenizer: vocab {len(tokenizer)}, train {len(train_stream)} tokens "
        f"({corpus.train_chars / len(train_stream):.2f} chars/token), held-out {len(eval_stream)} tokens "
        f"[{time.perf_counter() - t_start:.0f}s]",
        flush=True,
    )

    config = model_config(tokenizer)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {config.num_hidden_layers} blocks, {n_params:,} parameters; {steps} steps of "
        f"{s.batch_size}x{s.seq_len} tokens",
        flush=True,
    )

    opt = _optimizer(model, s)
    gen = torch.Generator().manual_seed(seed)  # batch order: its own stream, independent of init
    model.train()
    t_train, recent = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, s)
        starts = torch.randint(0, len(train_stream) - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = torch.stack([train_stream[i : i + s.seq_len + 1] for i in starts.tolist()])  # (B, T+1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        recent = [*recent[-19:], loss.item()]
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t_train
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(
                f"step {step:4d}/{steps}  loss {sum(recent) / len(recent):.3f}  lr {_lr_at(step, steps, s):.2e}"
                f"  {elapsed:.0f}s elapsed, ~{eta:.0f}s left",
                flush=True,
            )
    train_seconds = time.perf_counter() - t_train

    # Train loss measured like the held-out one (same window scheme), on an equally long prefix of train.
    eval_loss = heldout_loss(model, eval_stream, s.seq_len)
    train_loss = heldout_loss(model, train_stream[: len(eval_stream)], s.seq_len)
    uni_loss = unigram_loss(train_stream, eval_stream, len(tokenizer), s.seq_len)
    print(f"held-out loss {eval_loss:.3f} nats/token (train {train_loss:.3f}); unigram {uni_loss:.3f}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, out)
    # Token ids only: vLLM turns sampling fields found here into server-wide defaults, which we do not want.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    _patch_config_for_older_readers(out)
    report = {
        "model": "builtin:tiny",
        "params": n_params,
        "layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "train_tokens_seen": steps * s.batch_size * s.seq_len,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "train_loss": round(train_loss, 4),
        "heldout_loss": round(eval_loss, 4),
        "unigram_loss": round(uni_loss, 4),
        "loss_unit": "nats/token",
        "corpus_train_chars": corpus.train_chars,
        "corpus_heldout_chars": corpus.heldout_chars,
        "corpus_train_tokens": len(train_stream),
        "corpus_heldout_tokens": len(eval_stream),
        "corpus_fingerprint": corpus.fingerprint(),
        "corpus_skipped_modules": list(corpus.skipped_modules),
        "seed": seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": s.threads,
        "command": "python -m layercard_service.models.pretrain " + " ".join(sys.argv[1:]),
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out} [{report['total_seconds']:.0f}s total]", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=6.0,
        help=f"size of the run in 2-core minutes; sets steps = minutes * {STEPS_PER_MINUTE}",
    )
    parser.add_argument("--steps", type=int, default=None, help="exact number of steps (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else max(1, round(args.minutes * STEPS_PER_MINUTE))
    pretrain(args.out, steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
