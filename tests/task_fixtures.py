"""Models, data and tasks that are not autoprune's own, for tests/test_tasks.py: dict batches, keyword inputs,
integer token ids, dict outputs, regression targets, no labels, a custom task."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from autoprune.model.data import digits
from autoprune.model.task import Task


class DictDigits(Dataset):
    """sklearn digits as dict items {"image": [1, 8, 8], "labels": int}, or without labels."""

    def __init__(self, base, labels: bool = True, image_key: str = "image") -> None:
        self.base, self.labels, self.key = base, labels, image_key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {self.key: x, "labels": y} if self.labels else {self.key: x}


def dict_digits(labels: bool = True, image_key: str = "image"):
    return {k: DictDigits(v, labels, image_key) for k, v in digits().items()}


class KwargsCNN(nn.Module):
    """Takes `image=` (a keyword), returns {"logits": ..., "features": ...} like a ModelOutput."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, image: torch.Tensor) -> dict:
        f = self.features(image)
        return {"logits": self.head(f), "features": f}


def kwargs_cnn(width: int = 16) -> nn.Module:
    return KwargsCNN(width)


class TokenDataset(Dataset):
    """Integer token sequences (no labels): item {"input_ids": LongTensor[seq], "attention_mask": LongTensor[seq]}."""

    def __init__(self, n: int, seq: int = 12, vocab: int = 50, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = self._draw(n, seq, vocab, g)
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        self.mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def _draw(self, n: int, seq: int, vocab: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(1, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def tokens(n_train: int = 256, n_val: int = 128, n_test: int = 128):
    return {"train": TokenDataset(n_train, seed=0), "val": TokenDataset(n_val, seed=1), "test": TokenDataset(n_test, seed=2)}


class TinyEncoder(nn.Module):
    """An embedding + MLP encoder over token ids, returning {"last_hidden_state": [B, seq, dim]}; seeded init, so
    it is 'trained' as built (train.epochs: 0)."""

    def __init__(self, vocab: int = 50, dim: int = 32, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = self.emb(input_ids)
        h = h + self.out(F.gelu(self.fc2(F.gelu(self.fc1(h)))))
        return {"last_hidden_state": h}


def tiny_encoder() -> nn.Module:
    return TinyEncoder()


class RegressionSet(Dataset):
    """x in R^8 -> y = sin(x0) + x1 * x2 (one target), as (x, y) pairs."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (torch.sin(self.x[:, 0]) + self.x[:, 1] * self.x[:, 2]).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def regression_data():
    return {"train": RegressionSet(1024, 0), "val": RegressionSet(256, 1), "test": RegressionSet(256, 2)}


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


class Top2(Task):
    """A custom task: classification scored by top-2 accuracy, reading the 'logits' of a dict output."""

    name = "top2"
    metric_name = "top2"

    def loss(self, output, target, teacher=None):
        return F.cross_entropy(output, target)

    def batch_metric(self, output, target, teacher=None):
        top = output.topk(2, dim=1).indices
        return float((top == target[:, None]).any(1).sum()), len(target)


def top2() -> Task:
    return Top2(output="logits")


class BadOutputTask(Task):
    """Reads a field the model does not return."""

    name = "bad-output"

    def output(self, out, inputs=None):
        return out["probabilities"]

    def loss(self, output, target, teacher=None):
        return output.sum()

    def batch_metric(self, output, target, teacher=None):
        return 0.0, 1


def bad_output_task() -> Task:
    return BadOutputTask()


def convnext_digits(seed: int = 0) -> nn.Module:
    """A small raw transformers ConvNextForImageClassification for sklearn digits (8x8, one channel): layer scale
    parameters that no conv/linear/norm layer owns, and a channels-first LayerNorm subclass."""
    import transformers

    cfg = transformers.ConvNextConfig(num_channels=1, patch_size=2, hidden_sizes=[16, 32], depths=[1, 2],
                                      num_stages=2, num_labels=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.ConvNextForImageClassification(cfg).eval()


def tiny_qwen2_gqa(seed: int = 0) -> nn.Module:
    """A Qwen2 decoder with more query heads per key/value head than key/value heads (6 query heads on 2, as
    Qwen2.5-0.5B has 14 on 2): its query heads are pruned, as many from each key/value head. Random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=40))


def tiny_glm(seed: int = 0) -> nn.Module:
    """A GLM decoder from a small config: a fused gate/up MLP projection and grouped-query heads (2 key/value heads
    for 4 query heads), random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GlmForCausalLM(transformers.GlmConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=40, pad_token_id=0))


def tiny_bloom(seed: int = 0) -> nn.Module:
    """A BLOOM decoder from a small config: a fused query_key_value ([q k v] per head) and ALiBi position biases,
    random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4))


def tiny_falcon(seed: int = 0, alibi: bool = True) -> nn.Module:
    """A Falcon decoder (Falcon-RW style with ALiBi, or rotary) from a small config: a fused query_key_value
    ([q k v] per head) without grouped queries, random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=alibi, multi_query=False,
        new_decoder_architecture=False, bias=alibi))


def tiny_persimmon(seed: int = 0) -> nn.Module:
    """A Persimmon decoder (Fuyu's language model) from a small config: a fused query_key_value ([q k v] per head),
    per-head q/k LayerNorms, partial rotary embeddings, random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.PersimmonForCausalLM(transformers.PersimmonConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40))


def tiny_mpt(seed: int = 0) -> nn.Module:
    """An MPT decoder from a small config: a fused Wqkv ([q | k | v]) and ALiBi position biases, random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.MptForCausalLM(transformers.MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                                                              max_seq_len=40))


class CountingTokens(TokenDataset):
    """Token sequences that count: a random start a in 1..vocab-1 and a step k in {1, 2, 3} per sequence, token t
    is 1 + (a - 1 + t k) mod (vocab - 1); right-padded with 0 (attention_mask 0) to `seq`. The next token follows
    from the two before it: a language model learns it, where random tokens leave nothing to learn."""

    def _draw(self, n: int, seq: int, vocab: int, g: torch.Generator) -> torch.Tensor:
        start = torch.randint(1, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        return 1 + (start - 1 + torch.arange(seq)[None, :] * step) % (vocab - 1)


def counting_tokens(n_train: int = 512, n_val: int = 128, n_test: int = 128):
    return {"train": CountingTokens(n_train, seed=0), "val": CountingTokens(n_val, seed=1),
            "test": CountingTokens(n_test, seed=2)}


def tiny_llama_lm(seed: int = 0) -> nn.Module:
    """A Llama causal LM for `counting_tokens` (vocab 50, grouped-query heads: 4 query, 2 key/value), random init."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, pad_token_id=0, tie_word_embeddings=False))


class Squares(Dataset):
    """Detection on 32x32 images: one bright square each, its class the channel it is drawn in; items are
    (image, class, box) with the box as transformers' detectors take it (centre x, centre y, width, height in
    [0, 1]); `squares` batches them with a collate function that gives DETR's `labels`, a list of one dict per
    image."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            img = torch.randn(3, 32, 32, generator=g) * 0.1
            c = int(torch.randint(0, 3, (1,), generator=g))
            s = int(torch.randint(6, 12, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, 32 - s, (2,), generator=g))
            img[c, y0:y0 + s, x0:x0 + s] += 1.0
            self.items.append((img, c, torch.tensor([(x0 + s / 2) / 32, (y0 + s / 2) / 32, s / 32, s / 32])))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _detection_batch(items):
    return {"pixel_values": torch.stack([i[0] for i in items]),
            "labels": [{"class_labels": torch.tensor([i[1]]), "boxes": i[2][None]} for i in items]}


def squares(batch_size: int = 16):
    from torch.utils.data import DataLoader

    return {s: DataLoader(Squares(n, seed), batch_size=batch_size, shuffle=(s == "train"), collate_fn=_detection_batch,
                          generator=torch.Generator().manual_seed(0))
            for s, n, seed in (("train", 128, 0), ("val", 48, 1), ("test", 48, 2))}


def tiny_detector(seed: int = 0) -> nn.Module:
    """DETR (a ResNet backbone, 5 object queries, 3 classes) from a small config, random init: it computes its own
    loss (Hungarian matching, class, L1 and GIoU box terms) when given `labels`."""
    import transformers

    torch.manual_seed(seed)
    return transformers.DetrForObjectDetection(transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], out_features=["stage4"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_labels=3))
