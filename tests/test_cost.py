import keras
import pytest

from autoprec.cost import CostModel
from autoprec.errors import ArgumentError
from autoprec.graph import build_graph


def chain(width=256, depth=4, units_last=10):
    i = keras.Input((width,))
    x = i
    for k in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"d{k}")(x)
    out = keras.layers.Dense(units_last, name="out")(x)
    return build_graph(keras.Model(i, out))


def test_all_16bit_is_fastest_and_float32_is_one():
    g = chain()
    cm = CostModel(g, device="gpu")
    assert cm.speedup({}) == pytest.approx(1.0)
    all16 = g.resolve({u.path: "mixed_float16" for u in g.units})
    half = g.resolve({"d0": "mixed_float16", "d1": "mixed_float16"})
    assert cm.speedup(all16) > cm.speedup(half) > 1.0


def test_casts_are_charged_at_boundaries():
    g = chain(width=64)
    cm = CostModel(g, device="gpu")
    alternating = g.resolve({"d0": "mixed_float16", "d2": "mixed_float16"})
    contiguous = g.resolve({"d0": "mixed_float16", "d1": "mixed_float16"})
    # same FLOPs in 16-bit, but alternating precisions cross more boundaries
    assert cm.time(alternating) > cm.time(contiguous)


def test_cpu_float16_is_slower_and_bfloat16_faster():
    g = chain()
    cm = CostModel(g, device="cpu")
    assert cm.speedup(g.resolve({u.path: "mixed_float16" for u in g.units})) < 1.0
    assert cm.speedup(g.resolve({u.path: "mixed_bfloat16" for u in g.units})) > 1.0


def test_misaligned_dimensions_are_flagged_on_gpu_only():
    g = chain(width=60)
    assert {"d0", "d1", "d2", "d3"} <= CostModel(g, device="gpu").flagged
    assert CostModel(g, device="cpu").flagged == set()
    with pytest.raises(ArgumentError, match="device"):
        CostModel(g, device="tpu")
