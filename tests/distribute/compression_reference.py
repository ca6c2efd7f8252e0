"""Independent NumPy references of the compressors.

Stochastic ones take the uniform draws u explicitly, so the TF result can be
compared exactly for the same draws.
"""

import math

import ml_dtypes
import numpy as np


def sign(x):
    return np.where(x < 0, -1.0, 1.0).astype(np.float32)


def scaled_sign(x):
    return np.float32(np.mean(np.abs(x))) * sign(x)


def bucket_scaled_sign(x, bucket_size):
    """Scaled sign with one mean |x| per bucket of `bucket_size` elements."""
    flat = x.reshape(-1).astype(np.float64)
    out = np.empty_like(flat)
    for start in range(0, flat.size, bucket_size):
        part = flat[start : start + bucket_size]
        out[start : start + bucket_size] = np.mean(np.abs(part)) * sign(part)
    return out.reshape(x.shape).astype(np.float32)


def fp16(x):
    return np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)


def bf16(x):
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def qsgd(x, u, bits=8, bucket_size=512):
    s = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).astype(np.float64)
    d = flat.size
    size = min(bucket_size or d, d)
    count = -(-d // size)
    b = np.pad(flat, (0, count * size - d)).reshape(count, size)
    norm = np.linalg.norm(b, axis=1, keepdims=True)
    level = np.clip(np.floor(s * np.abs(b) / np.where(norm > 0, norm, 1) + u), 0, s)
    out = norm * np.where(b < 0, -1, 1) * level / s
    return out.reshape(-1)[:d].reshape(x.shape)


def terngrad(x, u):
    scale = np.max(np.abs(x))
    keep = u.reshape(x.shape) * scale < np.abs(x)
    return (scale * np.sign(x) * keep).astype(np.float32)


def natural(x, u):
    mantissa, exponent = np.frexp(
        np.abs(x).astype(np.float64)
    )  # |x| = m·2^E, m ∈ [0.5, 1)
    fraction = 2 * mantissa - 1  # |x| = 2^(E−1)·(1 + fraction)
    up = u.reshape(x.shape) < fraction
    out = np.sign(x) * np.ldexp(1.0, exponent - 1 + up)
    return np.where(x == 0, 0.0, out).astype(np.float32)


def natural_dithering(x, u, levels):
    norm = np.linalg.norm(x.astype(np.float64))
    r = np.abs(x) / norm
    smallest = 2.0 ** (1 - levels)
    lower = np.where(
        r < smallest, 0.0, 2.0 ** np.floor(np.log2(np.maximum(r, smallest)))
    )
    upper = np.where(r < smallest, smallest, 2 * lower)
    p = (r - lower) / (upper - lower)
    level = np.where(u.reshape(x.shape) < p, upper, lower)
    return (norm * np.sign(x) * np.minimum(level, 1.0)).astype(np.float32)


def topk(x, ratio):
    flat = x.reshape(-1)
    k = max(1, math.ceil(ratio * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


def powersgd_mean(matrices, q):
    """Mean of the replicas' matrices as PowerSGD reconstructs it (one round)."""
    p = sum(m @ q for m in matrices)
    basis, _ = np.linalg.qr(p)
    q_sum = sum(m.T @ basis for m in matrices)
    return basis @ q_sum.T / len(matrices)
