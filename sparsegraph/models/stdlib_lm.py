"""``stdlib_lm``: a small Llama decoder LM trained here on the standard library's docstrings, shipped with
its weights and tokenizer.

A causal-LM fixture whose weights are trained, not random, so sparsity passes on a decoder can be judged
by the held-out perplexity they keep. Nothing is downloaded: the text is the docstrings of the
interpreter's own standard library (the source `sparsegraph.data.stdlib_text` reads), the tokenizer and
the weights are trained on this machine and shipped in ``sparsegraph/models/weights/``.

Data (`documents`)
    Every ``.py`` file under the stdlib directory is parsed with ``ast`` (the walk and the skipped
    directories of `sparsegraph.data.stdlib_text`: no ``test``/``tests``/``idlelib``/``lib2to3``/
    ``site-packages``), and every module, class and function docstring (``ast.get_docstring``) is one
    document: its paragraphs with whitespace collapsed, joined by newlines. Whole docstrings, not just
    the filtered sentences of `stdlib_text`, because the sentences alone (0.7 MB) are too little text
    for a 10 M-parameter model; docstrings are 1.6 MB. Each text is kept once per split.
    The split is BY MODULE, by top-level name: a package goes with all its submodules (``email.*``),
    so near-copies inside a package do not straddle the split. A top-level module is held out when the
    first byte of the sha1 of its name is below 32 (1/8 of names); training documents that also occur
    in a held-out module are dropped from training (5 of them), so the held-out documents are read
    from the held-out modules alone: about a second, where the whole walk takes about ten. The split
    depends only on the module names and the text, not the file walk order; another Python version has
    other docstrings, so the figures below hold for CPython 3.11.7, where 22 top-level names are held
    out (``typing``, ``ipaddress``, ``json``, ``concurrent``, ``ctypes``, ``functools``, ``locale``,
    ...): 481 documents, 128 k characters (8.2% of the text), against 6881 training documents (1.43 M
    characters).

Tokenizer (`tokenizer`)
    A byte-level BPE (``tokenizers``, Hugging Face's GPT-2-style byte-level pre-tokenizer and decoder,
    so any text round-trips) with 4096 entries, trained on the training documents only; one special
    token ``<|endoftext|>`` (id 0) serves as BOS, EOS and padding, as in GPT-2. Shipped as
    ``stdlib_lm_tokenizer.json`` (0.26 MB) and given as a ``PreTrainedTokenizerFast``
    (``model.tokenizer``), which prepends ``<|endoftext|>`` to what it encodes. 3.76 characters a token
    on the training text, 3.37 on the held-out text. Chosen over bytes (vocabulary 256): at the same
    cost per token a token carries 3.4-3.8 times the text, and the 128-token window about 450
    characters.

Model (`CONFIG`)
    Hugging Face ``LlamaForCausalLM``: 6 layers, hidden 384, 6 query heads of 64, 2 KV heads (GQA),
    SwiGLU MLP with intermediate 1024, RMSNorm, RoPE, input and output embeddings tied; 11.0 M
    parameters (1.6 M of them the embedding). ``config.bos_token_id = eos_token_id = pad_token_id = 0``,
    ``use_cache`` at its default (True), so ``model.generate`` works as with any HF LM. Weights are
    stored in fp16 (22 MB) and loaded as fp32; every figure below is of the model as loaded.

Training (`train`)
    The training documents, each preceded by ``<|endoftext|>``, are one token stream (381,442 tokens).
    Every epoch starts the stream at a fresh random offset, cuts it into windows of 128 tokens and
    shuffles them (seeded generators); next-token cross-entropy on every position. AdamW (lr 2e-3,
    betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, one-cycle schedule (5% warm-up, cosine
    decay), batch 16 windows, 800 steps (1.6 M tokens, 4.3 epochs). Seeded, fixed order, 2 intra-op
    threads: a run on the same machine and torch build gives the same weights.
    ``python -m sparsegraph.models.stdlib_lm`` retrains the tokenizer and the model and rewrites both
    shipped files.

Evaluation (`heldout_ids`, `perplexity`)
    The held-out documents, as one stream like the training one, cut into consecutive windows of a given
    length; perplexity is exp of the mean next-token cross-entropy over every position but the first of
    each window, per token of this tokenizer. `perplexity` takes the model or any callable from token
    ids to logits (a compiled model). `unigram_perplexity` is the baseline of training-set token
    frequencies (add-one smoothed) on the same targets.

Figures measured (2-core Xeon with AMX, torch 2.14.1, transformers 5.24.0, 2 threads, CPython 3.11.7;
the machine was shared, load average 0.1-1.8 during the run): ``python -m sparsegraph.models.stdlib_lm``
took 595 s wall, of which training 584 s (tokenizer and data 8 s, 800 steps about 0.72 s each).
Held-out perplexity of the shipped model: 158.2 per token over the 297 held-out windows of 128 tokens
(37,719 targets); 162.7 in windows of 64. Unigram baseline on the same targets: 955.7; a random-init
model of the same shape: 4445. In bits per character that is about 2.17 (unigram 2.94). Greedy continuation
of "This module provides" is " a file-like object."; of "Return the number of" it is " the
turtle's turtle.\nThe result is a string. ..." (greedy decoding of a small LM repeats itself).

Other runs (same data and tokenizer unless said): lr 1e-3 measured 152.7 and lr 3e-3 with batch 8 for
1600 steps (the same tokens) 188.0, noisier throughout; the shipped recipe on an earlier split that
differed by 5 training documents (so other windows and another shuffle) measured 144.8. So lr 1e-3 and
2e-3 are within the run-to-run spread (about 10%); a smaller batch with a higher lr is worse. In that
earlier run the held-out perplexity was 322 at step 200, 202 at 400, 156 at 600, 147 at 700 and 145 at
800: still falling slowly at the end. The training loss ends near 4.2 (perplexity about 70), so part of
the gap to held-out is the held-out modules' own vocabulary (``typing``, ``ctypes``), part memorisation
(4.3 epochs). bf16 autocast on this CPU was three times slower than fp32 (602 against 1895 tokens/s in
a short benchmark), so training is fp32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import pathlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsegraph.data import stdlib_text

_DIR = pathlib.Path(__file__).parent / "weights"
WEIGHTS = _DIR / "stdlib_lm.safetensors"
TOKENIZER = _DIR / "stdlib_lm_tokenizer.json"

ENDOFTEXT = "<|endoftext|>"
VOCAB = 4096
CONTEXT = 128
HELDOUT_BELOW = 32  # a top-level module is held out when sha1(name)[0] < this (1/8 of names)
SPLITS = ("train", "heldout")

CONFIG = dict(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=CONTEXT,
              tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)

# Training recipe (see the module docstring for the figures it reaches).
STEPS = 800
BATCH = 16
LR = 2e-3
WEIGHT_DECAY = 0.1
WARMUP = 0.05
CLIP = 1.0


# ---------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def _module_documents(heldout: bool) -> tuple[str, ...]:
    """Every docstring of the held-out (or the training) modules as a document, each text once (its
    first place in the sorted file walk). Only that split's files are parsed: the held-out documents
    take a second, not the ten of the whole walk."""
    found: dict[str, None] = {}  # ordered set
    for doc in stdlib_text.docstrings(lambda module: is_heldout_module(module) == heldout):
        text = "\n".join(" ".join(p.split()) for p in doc.split("\n\n") if p.strip())
        if text:
            found.setdefault(text)
    return tuple(found)


def is_heldout_module(name: str) -> bool:
    """Whether top-level stdlib module (or package) `name` is in the held-out split."""
    return hashlib.sha1(name.encode()).digest()[0] < HELDOUT_BELOW


def heldout_modules() -> list[str]:
    """The held-out top-level modules (and packages) of this interpreter's stdlib, sorted."""
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted({top for path in root.rglob("*.py")
                   if not any(part in stdlib_text.SKIP_DIRS for part in path.parts)
                   and is_heldout_module(top := path.relative_to(root).parts[0].removesuffix(".py"))})


def documents(split: str) -> list[str]:
    """The documents (whole docstrings) of ``"train"`` or ``"heldout"`` modules, in a fixed order.

    Each text occurs once; a training text that also occurs in a held-out module is dropped from train,
    so no held-out text is trained on.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if split == "heldout":
        return list(_module_documents(True))
    heldout = set(_module_documents(True))
    return [text for text in _module_documents(False) if text not in heldout]


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer():
    """A byte-level BPE (`VOCAB` entries, ``<|endoftext|>`` first) trained on the training documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents("train"), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{ENDOFTEXT} $A",
                                                       special_tokens=[(ENDOFTEXT, 0)])
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                   pad_token=ENDOFTEXT, model_max_length=CONTEXT)


@functools.lru_cache(maxsize=1)
def _shipped_tokenizer():
    from tokenizers import Tokenizer

    if not TOKENIZER.is_file():
        raise FileNotFoundError(f"stdlib_lm tokenizer not found at {TOKENIZER}; rebuild it with "
                                "`python -m sparsegraph.models.stdlib_lm`")
    return Tokenizer.from_file(str(TOKENIZER))


def tokenizer():
    """The shipped tokenizer as a ``PreTrainedTokenizerFast`` (prepends ``<|endoftext|>`` when encoding;
    decode with ``skip_special_tokens=True`` to drop it)."""
    return _wrap(_shipped_tokenizer())


def _stream(split: str, tok=None) -> torch.Tensor:
    """The documents of `split` as one int64 token stream, each preceded by ``<|endoftext|>`` (id 0)."""
    tok = tok or _shipped_tokenizer()
    ids: list[int] = []
    for enc in tok.encode_batch(documents(split), add_special_tokens=False):
        ids.append(0)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def _heldout_stream() -> torch.Tensor:
    return _stream("heldout")


def heldout_ids(length: int = CONTEXT, count: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `length` tokens of the held-out stream, int64 [count,
    length] (all the windows that fit when `count` is None). The same on every call."""
    stream = _heldout_stream()
    available = len(stream) // length
    count = available if count is None else count
    if count > available:
        raise ValueError(f"the held-out stream holds {available} windows of {length} tokens, not {count}")
    return stream[:count * length].view(count, length).clone()


def train_ids(length: int = CONTEXT, count: int = 16) -> torch.Tensor:
    """The first `count` windows of `length` tokens of the training stream (calibration data that the
    held-out figures never see), int64 [count, length]."""
    return _stream("train")[:count * length].view(count, length).clone()


# ------------------------------------------------------------------------------------------- model
def _new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def train(seed: int = 0, steps: int | None = None, threads: int = 2, tok=None,
          log: Callable[[int, float, torch.nn.Module], None] | None = None):
    """Train a ``LlamaForCausalLM`` of `CONFIG` from scratch on the training stream (recipe in the module
    docstring), in eval mode, fp32, with ``model.tokenizer`` set.

    `tok` is the ``tokenizers.Tokenizer`` to train on (default: the shipped one). Deterministic for a
    given seed, torch build and machine. Uses `threads` intra-op threads while it runs and restores the
    previous setting afterwards; the caller's global RNG state is left alone. `log(step, loss, model)`
    is called every 50 steps (and after the last); it must leave the model's mode and weights alone.
    """
    tok = tok or _shipped_tokenizer()
    steps = STEPS if steps is None else steps
    stream = _stream("train", tok)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _new_model()
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=WARMUP,
                                                        anneal_strategy="cos")
            order = torch.Generator().manual_seed(seed)
            model.train()
            step, batches = 0, iter(())
            while step < steps:
                batch = next(batches, None)
                if batch is None:  # a new epoch: a fresh offset into the stream, windows shuffled
                    offset = int(torch.randint(0, CONTEXT, (1,), generator=order))
                    n = (len(stream) - offset) // CONTEXT
                    windows = stream[offset:offset + n * CONTEXT].view(n, CONTEXT)
                    batches = iter(windows[torch.randperm(n, generator=order)].split(BATCH))
                    continue
                logits = model(input_ids=batch, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                sched.step()
                step += 1
                if log is not None and (step % 50 == 0 or step == steps):
                    log(step, float(loss.detach()), model)
    finally:
        torch.set_num_threads(previous)
    model.eval()
    model.tokenizer = _wrap(tok)
    return model


def _logits(model_or_fn, ids: torch.Tensor) -> torch.Tensor:
    from transformers import PreTrainedModel

    if isinstance(model_or_fn, PreTrainedModel):
        return model_or_fn(input_ids=ids, use_cache=False).logits
    out = model_or_fn(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def perplexity(model_or_fn, length: int = CONTEXT, count: int | None = None, batch: int = 16) -> float:
    """Held-out perplexity per token: exp of the mean next-token cross-entropy over ``heldout_ids(length,
    count)`` (every position but each window's first).

    `model_or_fn` is the LM, or any callable from int64 ids [batch, length] to logits [batch, length,
    vocab] (or to an output with ``.logits``, or a tuple whose first item is the logits): a compiled model
    is scored the same way. A Hugging Face model is put in eval mode for the call and restored
    afterwards; anything else is called as it is.
    """
    from transformers import PreTrainedModel

    ids = heldout_ids(length, count)
    training = isinstance(model_or_fn, PreTrainedModel) and model_or_fn.training
    if training:
        model_or_fn.eval()
    try:
        total = 0.0
        for chunk in ids.split(batch):
            logits = _logits(model_or_fn, chunk).float()
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           chunk[:, 1:].reshape(-1), reduction="sum"))
    finally:
        if training:
            model_or_fn.train()
    return math.exp(total / (ids.shape[0] * (length - 1)))


def unigram_perplexity(length: int = CONTEXT, count: int | None = None) -> float:
    """The perplexity of training-set token frequencies (add-one smoothed) on `perplexity`'s targets."""
    counts = torch.bincount(_stream("train"), minlength=VOCAB).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = heldout_ids(length, count)[:, 1:].reshape(-1)
    return math.exp(-float(logp[targets].mean()))


@torch.no_grad()
def complete(model, prompt: str, new_tokens: int = 20) -> str:
    """Greedy continuation of `prompt` (`new_tokens` at most, stopping at ``<|endoftext|>``), decoded."""
    tok = model.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load(seq_len: int = 64, batch: int = 1):
    """The shipped trained ``LlamaForCausalLM`` (eval mode, fp32, ``model.tokenizer`` set) and
    ``(heldout_ids(seq_len, batch),)``. The caller's global RNG state is left alone."""
    from safetensors import safe_open

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"stdlib_lm weights not found at {WEIGHTS}; rebuild them with "
                                "`python -m sparsegraph.models.stdlib_lm` (minutes on a CPU)")
    tok = _shipped_tokenizer()
    with safe_open(str(WEIGHTS), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("config", "{}"))
        if stored != CONFIG:
            raise ValueError(f"{WEIGHTS} was trained with config {stored}, not this module's {CONFIG}; "
                             "rebuild it with `python -m sparsegraph.models.stdlib_lm`")
        state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    with torch.random.fork_rng(devices=[]):
        model = _new_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{WEIGHTS} does not fit {CONFIG}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    model.tokenizer = _wrap(tok)
    return model, (heldout_ids(seq_len, batch),)


def save(model, tok=None) -> None:
    """Write `model`'s weights (fp16; the tied ``lm_head.weight`` left out) and `tok` to the shipped files."""
    from safetensors.torch import save_file

    _DIR.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(WEIGHTS), metadata={"config": json.dumps(CONFIG)})
    if tok is not None:
        tok.save(str(TOKENIZER))
        _shipped_tokenizer.cache_clear()
        _heldout_stream.cache_clear()


def main() -> None:
    start = time.perf_counter()
    tok = train_tokenizer()
    tok_seconds = time.perf_counter() - start
    model = train(tok=tok, log=lambda step, loss, _: print(f"step {step:4d}  loss {loss:.3f}", flush=True))
    seconds = time.perf_counter() - start
    save(model, tok)
    loaded, _ = load()
    params = sum(p.numel() for p in loaded.parameters())
    print(f"stdlib_lm: {params / 1e6:.2f} M parameters; tokenizer {tok_seconds:.1f} s, total training "
          f"{seconds:.1f} s; held-out perplexity {perplexity(loaded):.2f} (unigram "
          f"{unigram_perplexity():.2f}); wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 1e6:.1f} MB) and "
          f"{TOKENIZER} ({TOKENIZER.stat().st_size / 1e6:.2f} MB)")
    print("greedy:", repr(complete(loaded, "Return the number of", 20)))


if __name__ == "__main__":
    main()
