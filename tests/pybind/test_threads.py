"""The GIL is released while libmoe computes (swig -threads), and a Layer serialises its callers."""

import threading
import time

import numpy as np

import libmoe
from conftest import randn


def test_gil_released_during_forward(rng):
    layer = libmoe.Layer(d_model=256, d_ff=1024, num_experts=8, top_k=2)
    x = randn(rng, 2048, 256)
    layer.forward(x[:64])  # warm up
    t0 = time.perf_counter()
    layer.forward(x)
    single = time.perf_counter() - t0

    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.01)
    start = time.perf_counter()
    layer.forward(x)
    end = time.perf_counter()
    stop.set()
    spinner.join()
    # With the GIL held for the whole call the spinner could not run inside [start, end].
    inside = [t for t in ticks if start + 0.1 * (end - start) < t < end - 0.1 * (end - start)]
    assert len(inside) >= 3, (single, end - start, len(ticks))


def test_one_layer_from_many_threads(rng):
    layer = libmoe.Layer(d_model=32, d_ff=64, num_experts=4, top_k=2)
    xs = [randn(rng, 64, 32) for _ in range(4)]
    expected = [layer.forward(x) for x in xs]
    errors = []

    def work(i):
        try:
            ctx = layer.context()
            for _ in range(25):
                np.testing.assert_array_equal(layer.forward(xs[i]), expected[i])
                layer.forward(xs[i], ctx)
                layer.backward(ctx, xs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_errors_are_per_thread():
    seen = {}

    def fail(i):
        try:
            libmoe.Layer(d_model=8, d_ff=16, top_k=100 + i)
        except libmoe.InvalidArgumentError as e:
            seen[i] = e.message

    threads = [threading.Thread(target=fail, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(f"top_k is {100 + i}" in seen[i] for i in range(8)), seen
