"""Token-by-token generation for a compiled causal LM: a prefill graph and a decode-step graph over a
static KV cache (`sparsegraph.kv_cache`), rewritten as the compile's plan says.

One compile, three graphs sharing the model's weights:

    full sequence   what ``cm(input_ids)`` runs, and what the analysis passes profile
    prefill         the prompt (q ≥ 2 tokens) → its last token's logits; the cache filled
    decode step     one token per sequence + its slot → logits; its keys and values written in place

The two cache graphs are traced from `kv_cache.CacheStep` and re-rooted, so their site ids and their
fingerprint are the model's own: the plan made on the full-sequence graph is checked against each and
*replayed* on it (no calibration, the same decisions: thresholds measured on the prefill-length data
serve every decode step). Only passes whose rewrites are per token apply (``Pass.decode``: weights and
activations, e.g. TEAL thresholds on q/k/v/o/gate/up/down); sequence-level rewrites (token selection,
attention layouts over a whole sequence) are left out there, their sites run dense in decoding, and
generation warns once naming them.

The loop (`Decoder.generate`) follows Hugging Face's ``generate`` where they overlap: left padding with
position ids ``cumsum(mask) − 1``; greedy, or sampling with temperature then top-k; rows that emitted
``eos_token_id`` continue with ``pad_token_id``; it stops when every row has finished. With the
``dense`` pipeline its greedy tokens are identical to ``model.generate``'s (tests/models).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsegraph.canonicalize import drop_identities, share_kv_heads
from sparsegraph.codegen import use_backend
from sparsegraph.config import Config
from sparsegraph.context import Batch, PassContext
from sparsegraph.errors import InputError
from sparsegraph.kv_cache import ROOT, CacheShape, CacheStep
from sparsegraph.manager import PassManager
from sparsegraph.onnx_export import export_onnx
from sparsegraph.pass_contract import AnalysisPass
from sparsegraph.plan import SparsityPlan
from sparsegraph.trace import trace

_EXAMPLE_BATCH, _EXAMPLE_PROMPT, _EXAMPLE_SLOTS = 2, 4, 8  # ≥ 2 along every dynamic dimension


@dataclass(frozen=True)
class GenerationStats:
    """What the last `Decoder.generate` call did and how long its parts took (seconds)."""

    batch: int
    prompt_tokens: int
    new_tokens: int  # generated per row (the longest row)
    prefill_s: float
    decode_s: float  # the decode steps, i.e. every token after the first

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens per second per sequence, over the decode steps."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.tokens_per_s if self.tokens_per_s == self.tokens_per_s else float("nan")


class Decoder:
    """The prefill and decode-step graphs of one compiled causal LM (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: Config, plan: SparsityPlan, model_class: str):
        self.shape = CacheShape.of(model)
        self.device = next(model.parameters()).device  # meta for a model planned without weights
        self.config = config
        self.left_out = [p.name for p in config.passes if not p.decode]
        defaults = getattr(model, "generation_config", None)  # eos and pad as model.generate reads them
        self.eos_token_id = getattr(defaults, "eos_token_id", None)
        self.pad_token_id = getattr(defaults, "pad_token_id", None)
        step = CacheStep(model)
        self.prefill = self._graph(step, plan, model_class, queries=_EXAMPLE_PROMPT)
        self.step = self._graph(step, plan, model_class, queries=1)
        _share_buffers(self.prefill, self.step)
        self.last: GenerationStats | None = None
        self._warned = False
        self._onnx: _OnnxDecoding | None = None

    def _example(self, queries: int) -> tuple[tuple, dict]:
        """Example inputs of a graph taking `queries` tokens, and which of their sizes may vary."""
        batch, slots, auto = _EXAMPLE_BATCH, _EXAMPLE_SLOTS, torch.export.Dim.AUTO
        ids = torch.zeros(batch, queries, dtype=torch.long, device=self.device)
        args = (ids, ids.clone(), torch.ones(batch, slots, dtype=torch.long, device=self.device),
                torch.tensor(0), self.shape.allocate(batch, slots, self.device))
        tokens = {0: auto, 1: auto} if queries > 1 else {0: auto}
        shapes = {"input_ids": tokens, "position_ids": tokens, "mask": {0: auto, 1: auto}, "start": None,
                  "cache": {1: auto, 3: auto}}
        return args, shapes

    def _graph(self, step: CacheStep, plan: SparsityPlan, model_class: str, queries: int):
        args, shapes = self._example(queries)
        gm = trace(step, args, dynamic_shapes=shapes, root=ROOT)
        plan.check_model(gm, model_class)  # the same model as the compile's, seen through the wrapper
        replayed = _decode_plan(plan, self.config)
        passes = [p for p in self.config.passes if p.decode]
        ctx = PassContext(plan=replayed, config=self.config, example=Batch(args), replay=True, quiet=True)
        gm = PassManager(passes).run(gm, ctx)
        drop_identities(gm)  # a decode step is a few hundred small calls: the ones that compute nothing go
        share_kv_heads(gm)  # no copy of the cache per kv-head group and step
        return gm

    def export_onnx(self, directory: str | os.PathLike, opset: int = 18) -> dict[str, Path]:
        """Write ``prefill.onnx`` and ``step.onnx`` into `directory`: each takes ``input_ids``,
        ``position_ids``, ``mask``, ``start`` and ``cache`` and returns ``logits`` and the updated cache,
        ``cache_out`` (ONNX has no in-place writes: the cache is an input and an output, so a runtime that
        binds both to one buffer updates it in place). Dynamic batch, prompt length and cache length."""
        directory = Path(directory)
        paths = {}
        for name, queries in (("prefill", _EXAMPLE_PROMPT), ("step", 1)):
            args, shapes = self._example(queries)
            paths[name] = export_onnx(_CacheOut(getattr(self, name)), directory / f"{name}.onnx", args,
                                      dynamic_shapes=shapes, opset=opset,
                                      output_names=["logits", "cache_out"])
        return paths

    def _runner(self):
        """``run(which, ids, positions, mask, start, cache) → (logits, cache)`` for the config's backend:
        the graphs in PyTorch (the cache updated in place), or their ONNX files in onnxruntime."""
        if self.config.backend != "onnx":
            return self._run_torch
        if self._onnx is None:
            directory = tempfile.TemporaryDirectory(prefix="sparsegraph-decode-")
            paths = self.export_onnx(directory.name)
            self._onnx = _OnnxDecoding(paths, directory)
        return self._onnx

    def run(self, which: str, ids, positions, mask, start: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the ``"prefill"`` or ``"step"`` graph on the config's backend: ``(logits, cache)``
        (the argument itself, written in place, in PyTorch; a new one from onnxruntime)."""
        return self._runner()(which, ids, positions, mask, start, cache)

    def _run_torch(self, which: str, ids, positions, mask, start: int, cache):
        with use_backend(self.config.backend):
            return getattr(self, which)(ids, positions, mask, torch.tensor(start), cache), cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, max_len: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch, prompt + new]`` token ids: the prompt (left-padded, as `attention_mask` says) and
        up to `max_new_tokens` generated after it. ``eos_token_id`` and ``pad_token_id`` default to the
        model's ``generation_config`` (as ``model.generate``); pad falls back to the first eos id.
        ``max_len`` sizes the static cache (default: prompt + max_new_tokens); a cache too small for the
        request is refused before anything runs."""
        ids, mask = _check_prompt(input_ids, attention_mask)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        batch, prompt = ids.shape
        slots = max_len if max_len is not None else prompt + max_new_tokens
        if prompt + max_new_tokens > slots:
            raise InputError(f"the KV cache holds {slots} tokens but the prompt ({prompt}) plus "
                             f"max_new_tokens ({max_new_tokens}) need {prompt + max_new_tokens}: raise "
                             "max_len or lower max_new_tokens")
        self.shape.check_length(slots)
        self._warn_left_out()
        eos_token_id = self.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = self.pad_token_id if pad_token_id is None else pad_token_id
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

        run = self._runner()
        cache = self.shape.allocate(batch, slots, ids.device)
        slot_mask = torch.zeros(batch, slots, dtype=torch.long, device=ids.device)
        slot_mask[:, :prompt] = mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        started = time.perf_counter()
        logits, cache = run("prefill", ids, positions, slot_mask, 0, cache)
        logits = logits[:, -1]
        prefilled = time.perf_counter()
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        position = mask.sum(-1, keepdim=True) - 1
        out = [ids]
        for t in range(max_new_tokens):
            token = _choose(logits, do_sample, temperature, top_k, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            out.append(token[:, None])
            finished |= torch.isin(token, eos)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            slot_mask[:, prompt + t] = 1
            position = position + 1
            logits, cache = run("step", token[:, None], position, slot_mask, prompt + t, cache)
            logits = logits[:, -1]
        done = time.perf_counter()
        self.last = GenerationStats(batch, prompt, len(out) - 1, prefilled - started, done - prefilled)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def teacher_forced(self, input_ids: torch.Tensor, prompt: int) -> torch.Tensor:
        """Next-token logits ``[batch, length, vocabulary]`` for every position of `input_ids` (unpadded):
        the first `prompt` from the prefill graph, each later one from a decode step fed the text's own
        token (teacher forcing). How text scores through the decode graphs, so through rewrites that act
        in decode steps only (decode attention): perplexity as generation would see it."""
        ids, _ = _check_prompt(input_ids, None)
        batch, length = ids.shape
        if not 1 <= prompt <= length:
            raise InputError(f"prompt must be in 1 … {length} (the text's length), got {prompt}")
        self.shape.check_length(length)
        self._warn_left_out()
        run = self._runner()
        cache = self.shape.allocate(batch, length, ids.device)
        slot_mask = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
        slot_mask[:, :prompt] = 1
        positions = torch.arange(length, device=ids.device).expand(batch, length)
        logits, cache = run("prefill", ids[:, :prompt], positions[:, :prompt], slot_mask, 0, cache)
        out = [logits]
        for t in range(prompt, length):
            slot_mask[:, t] = 1
            logits, cache = run("step", ids[:, t:t + 1], positions[:, t:t + 1], slot_mask, t, cache)
            out.append(logits)
        return torch.cat(out, dim=1)

    def _warn_left_out(self) -> None:
        if self.left_out and not self._warned:
            self._warned = True
            warnings.warn(f"passes {self.left_out} rewrite whole sequences, not single tokens: their sites "
                          "run dense in generate (prefill and decode steps)", stacklevel=3)


class _CacheOut(torch.nn.Module):
    """A cache graph as a function: ``(logits, cache')`` from a copy of the cache, for ONNX export."""

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.inner = graph

    def forward(self, input_ids, position_ids, mask, start, cache):
        cache = cache.clone()
        return self.inner(input_ids, position_ids, mask, start, cache), cache


class _OnnxDecoding:
    """The exported prefill and step files in onnxruntime, called as `Decoder._run_torch` is."""

    def __init__(self, paths: dict[str, Path], directory: tempfile.TemporaryDirectory):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()
        self.sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for name, path in paths.items()}
        self.directory = directory  # the files live as long as the sessions

    def __call__(self, which: str, ids, positions, mask, start: int, cache):
        session = self.sessions[which]
        values = (ids, positions, mask, torch.tensor(start), cache)
        feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), values)}
        logits, cache = session.run(["logits", "cache_out"], feeds)
        return torch.from_numpy(logits), torch.from_numpy(cache)


def _decode_plan(plan: SparsityPlan, config: Config) -> SparsityPlan:
    """A copy of `plan` to replay on a cache graph: the decisions of passes left out of decoding are
    dropped, and so are later passes' decisions on the sites those had rewritten (they were made about a
    site that, in decoding, stays as it was)."""
    copy = SparsityPlan.from_json(plan.to_json())
    untouched: set[str] = set()  # sites a left-out pass rewrote: dense in decoding
    for p in config.passes:
        if isinstance(p, AnalysisPass):
            continue
        decisions, _ = copy.decisions(p.name)
        for site in decisions:
            if not p.decode:
                untouched.add(site)
            if not p.decode or site in untouched:
                del copy.sites[site][p.name]
    return copy


def _share_buffers(source: torch.fx.GraphModule, target: torch.fx.GraphModule) -> None:
    """Let `target` use `source`'s copy of every buffer a rewrite added to both with equal contents (the
    two graphs replay one plan on the same weights), so decoding does not hold them twice."""
    theirs = dict(source.named_buffers())
    for name, tensor in list(target.named_buffers()):
        other = theirs.get(name)
        if (name.startswith("sg_") and other is not None and other.shape == tensor.shape
                and other.dtype == tensor.dtype and torch.equal(other, tensor)):
            setattr(target, name, other)


def _check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError("input_ids must be a [batch, length] int64 tensor of token ids "
                         f"(got {getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))})")
    if input_ids.shape[1] < 2:
        raise InputError("the prompt must hold at least 2 tokens (the prefill graph is traced for q ≥ 2; "
                         "prepend a BOS token)")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    if mask.shape != input_ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"attention_mask must be 0/1 and shaped like input_ids {tuple(input_ids.shape)}")
    if not bool(mask[:, -1].all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise InputError("the prompts must be padded on the left (tokenizer.padding_side = 'left'): every "
                         "row's real tokens must end at the last column")
    return input_ids, mask


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]

