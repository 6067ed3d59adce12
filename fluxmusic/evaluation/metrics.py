"""Distribution metrics on embeddings and class probabilities: Fréchet distance (FAD-style), KL divergence,
Inception-style score, and the CLAP score (mean cosine of paired embeddings). Pure numpy/scipy."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from fluxmusic.errors import FluxMusicError

_EPS = 1e-10


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of ``x`` [N, D], in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise FluxMusicError(f"a Fréchet distance needs at least 2 embeddings [N, D], got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets:
    ``|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2))``.

    With fewer samples than dimensions the covariances are singular; ``sqrtm`` of the product can then come
    out non-finite, and as in the reference FID code we retry with ``eps`` added to both diagonals. The small
    imaginary part numerical noise leaves in the square root is dropped. Like FID/FAD the estimate is biased
    upward for small N, so only compare distances computed from equally sized sets.
    """
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    if mu1.shape != mu2.shape:
        raise FluxMusicError(f"embedding widths differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular is expected for N <= D
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean)))
    return max(d, 0.0)  # rounding can leave a tiny negative number for identical sets


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats along the last axis (rows are probability vectors; clipped away from 0)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, None)
    q = np.clip(np.asarray(q, dtype=np.float64), _EPS, None)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    return (p * (np.log(p) - np.log(q))).sum(-1)


def marginal_kl(p_ref: np.ndarray, p_gen: np.ndarray) -> float:
    """KL between the class marginals of two sets of per-clip distributions [N, K]: KL(mean p_ref || mean p_gen).

    Unpaired: it asks whether the generated set covers the classes as often as the reference does.
    """
    return float(kl_divergence(np.mean(p_ref, 0), np.mean(p_gen, 0)))


def paired_kl(p_ref: np.ndarray, p_gen: np.ndarray) -> float:
    """Mean per-pair KL(p_ref_i || p_gen_i) (AudioLDM/FluxMusic convention, generated clip vs its reference)."""
    if np.shape(p_ref) != np.shape(p_gen):
        raise FluxMusicError(f"paired KL needs equal shapes, got {np.shape(p_ref)} and {np.shape(p_gen)}")
    return float(kl_divergence(p_ref, p_gen).mean())


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))): 1 when every clip gets the same distribution, K when clips are confidently
    and evenly spread over K classes."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1:
        raise FluxMusicError(f"an inception score needs class probabilities [N, K], got shape {probs.shape}")
    return float(np.exp(kl_divergence(probs, probs.mean(0, keepdims=True)).mean()))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` [N, D]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), _EPS)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), _EPS)
    return (a * b).sum(-1)


def clap_score(text_emb: np.ndarray, audio_emb: np.ndarray) -> float:
    """Mean cosine between each prompt's text embedding and its audio's embedding."""
    return float(cosine_rows(text_emb, audio_emb).mean())


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (for the shuffled-prompts baseline): a random cyclic shift of a
    random order, so every item is paired with another one."""
    if n < 2:
        raise FluxMusicError(f"shuffled prompts need at least 2 prompts, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    out = np.empty(n, dtype=np.int64)
    out[order] = order[(np.arange(n) + shift) % n]
    return out
