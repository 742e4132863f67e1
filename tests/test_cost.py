import keras
import pytest

from autoprec.errors import ArgumentError
from autoprec.graph import build_graph
from autoprec.search.cost import CostModel


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
        CostModel(g, device="npu")


# --- which device the policy is for ---------------------------------------------


@pytest.mark.parametrize("fast", ["0", "1"])
@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_the_default_device_is_the_accelerator_whatever_cpu_tunes(monkeypatch, fast, target):
    """The policy is for GPU training: the CPU that happens to run tune never changes the default."""
    from autoprec.backends import FAST_BF16_ENV
    from autoprec.search.cost import resolve_device

    monkeypatch.setenv(FAST_BF16_ENV, fast)
    device, why = resolve_device(None, target=target)
    assert device.name == "gpu" and "device=" in why


@pytest.mark.parametrize(("fast", "expected"), [("0", "cpu_no_bf16"), ("1", "cpu")])
def test_device_this_is_the_local_machine_and_the_override_forces_its_kind(monkeypatch, fast, expected):
    from autoprec.backends import FAST_BF16_ENV, cpu_has_fast_bf16
    from autoprec.search.cost import resolve_device

    monkeypatch.setenv(FAST_BF16_ENV, fast)
    assert cpu_has_fast_bf16() == (fast == "1")
    assert resolve_device("this", target="mixed_bfloat16")[0].name == expected
    # target="auto" reads this machine, so its cost model does too
    assert resolve_device(None, target="mixed_bfloat16", target_why="no GPU; ...")[0].name == expected


def test_a_device_slower_in_16bit_says_so_and_how_to_change_it():
    from autoprec.search.cost import DEVICES, slower_note

    note = slower_note(DEVICES["cpu_no_bf16"], "mixed_bfloat16")
    assert "0.8x" in note and "device='gpu'" in note
    assert slower_note(DEVICES["gpu"], "mixed_bfloat16") == ""
    assert slower_note(DEVICES["tpu"], "mixed_float16") == ""  # no gain, but not slower


def test_unknown_device_names_what_is_valid():
    from autoprec.search.cost import resolve_device

    with pytest.raises(ArgumentError, match=r"'gpu'.*'tpu'.*'this'.*Received: device='npu'"):
        resolve_device("npu", target="mixed_bfloat16")
