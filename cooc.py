"""The embedded model's co-listening start: before its first build step, every whole-title token's embedding is
that artist's vector from the train users' co-listening (what a real LLM brings about which artists go together).

ppmi (positive pointwise mutual information of items listened at most `window` apart, weight 1/distance) →
top_eigen (float64 eigh) → spectral_embeddings (eigenvectors × √eigenvalue, rows of unit length) →
init_item_embeddings (the rows, times the recipe's row length, into the tied embedding). Train split only.
"""
from __future__ import annotations

import collections

import torch

import data_interface as di
import pretrain_data
import tokens


def ppmi(seqs: list[list[int]], n: int, window: int) -> torch.Tensor:
    """(n, n) float64 positive pointwise mutual information of co-listening: two items listened at most
    `window` apart in a sequence count 1/distance per occurrence, in both directions (symmetric);
    PPMI[a, b] = max(0, log(c[a, b] * total / (row[a] * row[b]))), 0 where c[a, b] = 0."""
    c = torch.zeros(n, n, dtype=torch.float64)
    for s in seqs:
        t = torch.tensor(s, dtype=torch.long)
        for k in range(1, min(window, len(s) - 1) + 1):
            c.index_put_((t[:-k], t[k:]), torch.full((len(s) - k,), 1.0 / k, dtype=torch.float64), accumulate=True)
    c = c + c.T
    row = c.sum(1)
    pmi = torch.log(c * c.sum() / (row[:, None] * row[None, :]).clamp(min=1e-300))
    return torch.where(c > 0, pmi, torch.zeros_like(pmi)).clamp(min=0)


def top_eigen(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (descending) and their eigenvectors (columns) of a symmetric matrix
    (float64 eigh)."""
    lam, vec = torch.linalg.eigh(matrix.double())
    return lam.flip(0)[:k], vec.flip(1)[:, :k]


def spectral_embeddings(lam: torch.Tensor, vec: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) float32 rows from a symmetric matrix's leading eigenpairs (top_eigen): the first `dim`
    eigenvectors, each scaled by the square root of its eigenvalue (negative ones count as 0), so that two
    rows' dot product approximates the matrix's entry; each row then of unit length; zero columns beyond the
    eigenpairs given. Deterministic up to float rounding: each eigenvector's sign is the one that makes its
    largest entry positive."""
    k = min(dim, len(lam))
    lam, vec = lam[:k].clamp(min=0), vec[:, :k]
    vec = vec * lam.sqrt() * vec.gather(0, vec.abs().argmax(0, keepdim=True)).sign()
    vec = torch.nn.functional.pad(vec, (0, dim - k))
    return (vec / vec.norm(dim=1, keepdim=True).clamp(min=1e-12)).float()


_COOC_CACHE: dict = {}  # (data fingerprint, window) -> top_eigen of its ppmi, >= 512 pairs (one eigh each)

def cooccurrence_embeddings(catalog, dim: int, window: int = 8) -> torch.Tensor:
    """(n_items, dim) item vectors of the train users' co-listening (train split only): spectral_embeddings of
    its ppmi matrix. The eigendecomposition (~7 s on 2 cores for LastFM's 4,606 items) is kept per process
    for the dataset's content (data_fingerprint: id2name.txt + train.jsonl), so builds of several widths
    share it."""
    key, n = (di.data_fingerprint(catalog), window), catalog.n_items
    if key not in _COOC_CACHE or _COOC_CACHE[key][0].shape[0] < min(dim, n):
        _COOC_CACHE[key] = top_eigen(ppmi(pretrain_data.user_sequences(catalog, "train"), n, window), min(n, max(dim, 512)))
    return spectral_embeddings(*_COOC_CACHE[key], dim)


def init_item_embeddings(model, tokenizer, catalog, window: int, norm: float) -> int:
    """pretrain_embed_init="cooc": the (tied) embedding row of every title whose answer is one token of its own
    (+ EOS) becomes its cooccurrence_embeddings vector times `norm`; other rows keep their random
    initialisation. Returns how many titles got one."""
    emb = model.get_input_embeddings().weight
    prefix, answers = tokens.answer_tokens(tokenizer, catalog)
    first = [a[len(prefix)] for a in answers]
    counts = collections.Counter(first)
    items = [i for i, a in enumerate(answers) if len(a) == len(prefix) + 2 and counts[first[i]] == 1]
    if not items:
        return 0
    vec = cooccurrence_embeddings(catalog, emb.shape[1], window)
    with torch.no_grad():
        emb[torch.tensor([first[i] for i in items])] = vec[items].to(emb.dtype) * norm
    return len(items)
