"""numpy re-implementation of libmoe's counter-based generator (src/core/rng.h), so that the
PyTorch reference draws exactly the router noise and jitter the library draws.

rng_bits(seed, stream, counter) = mix64(mix64(seed ^ G) ^ mix64(stream + S) ^ counter * M), with
splitmix64's finaliser as mix64; all arithmetic is modulo 2^64 (numpy uint64 arrays wrap).
"""
import numpy as np

STREAM_NOISE = np.uint64(1 << 32)
STREAM_JITTER = np.uint64(2 << 32)

_U = np.uint64


def mix64(z):
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


def rng_bits(seed, stream, counter):
    seed = np.asarray([seed], dtype=np.uint64)
    stream = np.asarray([stream], dtype=np.uint64)
    counter = np.asarray(counter, dtype=np.uint64)
    with np.errstate(over="ignore"):
        a = mix64(seed ^ _U(0x9E3779B97F4A7C15))
        b = mix64(stream + _U(0x632BE59BD9B4E019))
        c = counter * _U(0xD1B54A32D192ED03)
    return mix64(a ^ b ^ c)


def rng_uniform(seed, stream, counter):
    """float32 in [0, 1) with 24 random bits."""
    b = rng_bits(seed, stream, counter)
    return (b >> _U(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def rng_normal(seed, stream, counter):
    """float32 standard normal, Box-Muller in double on the two halves of one 64-bit draw."""
    b = rng_bits(seed, stream, counter)
    u1 = ((b >> _U(40)).astype(np.float64) + 1.0) * (1.0 / 16777217.0)
    u2 = (b & _U(0xFFFFFF)).astype(np.float64) * (1.0 / 16777216.0)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2)).astype(np.float32)


def noise_draws(seed, step, T, E):
    """N [T,E] of a training forward at step `step`: element i = t*E + e."""
    i = np.arange(T * E, dtype=np.uint64)
    return rng_normal(seed, STREAM_NOISE + np.uint64(step), i).reshape(T, E)


def jitter_factors(seed, step, T, d, eps):
    """Multiplicative jitter [T,d] at step `step`: 1 - eps + 2 eps U, element i = t*d + c, float32."""
    i = np.arange(T * d, dtype=np.uint64)
    u = rng_uniform(seed, STREAM_JITTER + np.uint64(step), i).reshape(T, d)
    eps = np.float32(eps)
    return (np.float32(1.0) - eps + np.float32(2.0) * eps * u).astype(np.float32)
