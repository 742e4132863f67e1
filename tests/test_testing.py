import numpy as np

from autoprec import testing


def test_planting_keeps_the_float32_function():
    import keras
    import pytest

    (x_train, y_train), (x_val, _) = testing.digits_data(flat=True)
    model = testing.train(testing.mlp(depth=4, width=32), x_train, y_train, epochs=2)
    model.get_layer("d3").activation = keras.activations.linear  # plant_offset needs a linear producer
    before = model.predict(x_val, verbose=0)
    factor = testing.plant_overflow(model, "d1", "d2", x_train, peak=1e6)
    testing.plant_offset(model, "d3", "d4", offset=512.0)
    after = model.predict(x_val, verbose=0)
    assert factor > 1e3
    assert np.max(np.abs(after - before)) < 1e-3
    with pytest.raises(ValueError, match="linear producer"):
        testing.plant_offset(model, "d1", "d2")


def test_custom_layer_sublayers_are_covered():
    import keras

    from autoprec.graph import build_graph

    @keras.saving.register_keras_serializable(package="autoprec_tests")
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(4, name="inner")

        def call(self, x):
            return self.inner(x)

    i = keras.Input((4,))
    out = keras.layers.Dense(2, name="head")(Block(name="block")(i))
    g = build_graph(keras.Model(i, out))
    assert ("block/inner", "Dense") in g.fingerprint()
    assert g.resolve({"block": "mixed_bfloat16"})["block/inner"] == "mixed_bfloat16"
