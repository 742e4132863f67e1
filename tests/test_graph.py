import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS

from autoprec.decisions import Reason as reasons
from autoprec.errors import PathCollisionError, PolicyError, UnsupportedModelError
from autoprec.graph import build_graph, match_paths
from autoprec.profiling.flops import layer_flops


def test_functional_graph_facts():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(5, name="logits")(x)
    out = keras.layers.Softmax(name="probs")(x)
    g = build_graph(keras.Model(inputs, out))
    conv = g["conv"]
    assert conv.flops == 2 * 3 * 3 * 3 * 4 * 8 * 8
    assert conv.params == 3 * 3 * 3 * 4 + 4
    assert conv.output_bytes == 4 * 8 * 8 * 4
    assert g["logits"].flops == 2 * 256 * 5
    assert g["probs"].pinned == reasons.PINNED_OUTPUT
    assert g["logits"].pinned is None and g["logits"].is_unit
    assert g["relu"].follows and g["relu"].producers == ("bn",)
    assert [u.path for u in g.units] == ["conv", "bn", "logits"]
    frame = g.to_frame()
    assert list(frame["path"]) == ["conv", "bn", "relu", "flat", "logits", "probs"]
    assert frame["flops_share"].sum() == pytest.approx(1.0)


def test_softmax_before_output_is_pinned():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="d")(inputs)
    x = keras.layers.Activation("softmax", name="act")(x)
    out = keras.layers.Dropout(0.1, name="drop")(x)
    g = build_graph(keras.Model(inputs, out))
    assert g["drop"].pinned == reasons.PINNED_OUTPUT
    assert g["act"].pinned == reasons.PINNED_SOFTMAX
    assert g["d"].pinned is None


@pytest.mark.parametrize("kind", sorted(MODEL_BUILDERS))
def test_every_kind_lists_leaves(kind):
    model = MODEL_BUILDERS[kind]()
    g = build_graph(model, sample=np.zeros((2, 12), "float32"))
    paths = [i.path for i in g.layers]
    assert len(paths) == len(set(paths))
    assert all(i.flops > 0 for i in g.layers if i.class_name == "Dense")
    assert sum(1 for i in g.layers if i.pinned == reasons.PINNED_OUTPUT) >= 1
    assert g.fingerprint() == sorted(g.fingerprint())


def test_nested_producers_cross_model_boundaries():
    g = build_graph(MODEL_BUILDERS["nested"]())
    assert g["inner_dense"].producers == ("outer_dense",)
    assert g["inner_dense"].parent == "inner"
    assert set(g["skip"].producers) == {"inner_bn", "proj"}


def test_subclassed_order_from_sample():
    g = build_graph(MODEL_BUILDERS["subclassed"](), sample=np.zeros((1, 12), "float32"))
    assert [i.path for i in g.layers] == ["sub_d1", "sub_d2", "sub_out"]
    assert g["sub_d2"].flops == 2 * 16 * 16
    assert g.outputs == ("sub_out",)


def test_path_collision_detected():
    def sub(name):
        i = keras.Input((4,))
        return keras.Model(i, keras.layers.Dense(4, name="dense")(i), name=name)

    a, b = sub("a"), sub("b")
    i = keras.Input((4,))
    model = keras.Model(i, keras.layers.Dense(2, name="head")(b(a(i))))
    with pytest.raises(PathCollisionError, match="'dense'.*distinct names"):
        build_graph(model)


def test_shared_layer_is_one_entry_with_summed_flops():
    shared = keras.layers.Dense(4, name="shared")
    i = keras.Input((4,))
    out = keras.layers.Dense(2, name="head")(shared(shared(i)))
    g = build_graph(keras.Model(i, out))
    assert [x.path for x in g.layers].count("shared") == 1
    assert g["shared"].flops == 2 * (2 * 4 * 4)


def test_user_pins_and_regex():
    model = MODEL_BUILDERS["functional"]()
    g = build_graph(model, keep_float32=["h.*"])
    assert g["h1"].pinned == g["h2"].pinned == reasons.PINNED_USER
    assert [u.path for u in g.units] == ["bn"]
    with pytest.raises(PolicyError, match="matches none"):
        build_graph(model, keep_float32=["nope"])
    with pytest.raises(PolicyError, match="at most one"):
        build_graph(model, keep_float32=["h1"], force_16bit=["h1"])
    assert match_paths("h1", ["h1", "h10"], what="x") == ["h1"]


def test_resolve_followers_and_mixed_producers():
    i = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(i)
    b = keras.layers.Dense(4, name="b")(i)
    s = keras.layers.Add(name="sum")([a, b])
    out = keras.layers.Dense(2, name="out")(s)
    g = build_graph(keras.Model(i, out))
    assert g.resolve({"a": "mixed_float16", "b": "mixed_float16"})["sum"] == "mixed_float16"
    assert g.resolve({"a": "mixed_float16"})["sum"] == "float32"
    assert g.resolve({"a": "mixed_float16", "b": "mixed_bfloat16"})["sum"] == "float32"


def test_raw_operations_follow_and_are_not_policy_entries():
    i = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(i)
    doubled = keras.ops.multiply(a, 2.0)
    out = keras.layers.Dense(2, name="out")(doubled)
    g = build_graph(keras.Model(i, out))
    ops_rows = [x for x in g.layers if not x.is_layer]
    assert ops_rows and all(x.follows for x in ops_rows)
    assert set(g.resolve({"a": "mixed_float16"})) == {"a", "out"}


def test_flops_of_heavy_layers():
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    q = keras.Input((5, 8))
    keras.Model(q, mha(q, q))
    f = layer_flops(mha, [(None, 5, 8), (None, 5, 8)], [(None, 5, 8)])
    proj = 4 * 2 * 5 * (8 * 2 * 4)
    assert f == pytest.approx(proj + 2 * 5 * 5 * 2 * (4 + 4))
    lstm = keras.layers.LSTM(6)
    lstm.build((None, 7, 3))
    assert layer_flops(lstm, [(None, 7, 3)], [(None, 6)]) == 2 * 7 * (3 * 24 + 6 * 24)
    sep = keras.layers.SeparableConv2D(8, 3, padding="same")
    sep.build((None, 6, 6, 4))
    assert layer_flops(sep, [(None, 6, 6, 4)], [(None, 6, 6, 8)]) == 2 * 36 * (3 * 3 * 4 + 4 * 8)
    emb = keras.layers.Embedding(10, 4)
    emb.build((None, 3))
    assert layer_flops(emb, [(None, 3)], [(None, 3, 4)]) == 12


def test_rejects_non_models():
    with pytest.raises(UnsupportedModelError, match="keras.Model"):
        build_graph("model.keras")


def test_unbuilt_sublayers_that_repeat_across_blocks_get_keys_under_their_block():
    """Issue 25: KerasHub blocks each hold a never-built Dropout (path None) with the same name: PathCollisionError."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(8, name="ff")
            self.dropout = keras.layers.Dropout(0.1, name="self_attention_dropout")

        def build(self, shape):
            self.dense.build(shape)

        def call(self, x, training=False):
            return self.dropout(self.dense(x), training=training)

    i = keras.Input((8,))
    out = keras.layers.Dense(2, name="out")(Block(name="block_1")(Block(name="block_0")(i)))
    model = keras.Model(i, out)
    assert all(getattr(b.dropout, "path", None) is None for b in model.layers[1:3])
    graph = build_graph(model)
    keys = set(graph.all_paths())
    assert {"block_0/self_attention_dropout", "block_1/self_attention_dropout"} <= keys
    # the emitted map resolves on the real model: the built sublayers' paths, and no key that matches two layers
    from autoprec import PrecisionPolicy

    policy = PrecisionPolicy(graph.resolve({u.path: "mixed_bfloat16" for u in graph.units}))
    mapping = policy.to_keras(model)
    assert mapping[model.layers[1].dense.path].name == "mixed_bfloat16"


def test_variable_length_attention_is_costed_from_the_sample():
    """Issue 25: keras.Input((None,)) into MultiHeadAttention: TypeError in the FLOP count, and 0 FLOPs elsewhere."""
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    h = keras.layers.Dense(16, name="ff")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(keras.layers.GlobalAveragePooling1D(name="pool")(h))
    model = keras.Model(tokens, out)
    assert build_graph(model)["mha"].flops > 0  # without a sample: no crash
    seq = 12
    graph = build_graph(model, sample=np.zeros((2, seq), "int32"))
    # projections: q, k, v and output, 2*seq*|kernel| each; scores and weighted sum: 2*seq*seq*heads*(key+value dim)
    projections = 4 * 2 * seq * (16 * 2 * 8)
    attention = 2 * seq * seq * 2 * (8 + 8)
    assert graph["mha"].flops == pytest.approx(projections + attention, rel=0.01)
    assert graph["ff"].flops == pytest.approx(2 * seq * 16 * 16 + seq * 16, rel=0.1)


def test_activations_inside_a_block_are_counted_for_the_gradient_tape():
    """Issue 27: a block's own output is a small part of what a tape holds; micro-batches are sized from the rest."""
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    out = keras.layers.Dense(3, name="out")(keras.layers.GlobalAveragePooling1D(name="pool")(h))
    model = keras.Model(tokens, out)
    seq = 12
    graph = build_graph(model, sample=np.zeros((2, seq), "int32"))
    # query, key, value (seq x 2 heads x 8) and the output projection (seq x 16), float32; then the fused
    # attention's scores and their softmax (2 heads x seq x seq each), which no Softmax sublayer records
    assert graph["mha"].inner_bytes == pytest.approx(4 * (3 * seq * 16 + seq * 16) + 2 * 4 * 2 * seq * seq)
    assert graph["mha"].inner_bytes > 5 * graph["mha"].output_bytes
    assert graph["embed"].inner_bytes == 0.0 and graph["out"].inner_bytes == 0.0  # leaves hold only their output


@pytest.mark.parametrize("kind", ["TransformerEncoder", "TransformerDecoder"])
def test_a_kerashub_transformer_block_is_costed_like_the_analytic_count(kind):
    """Issue 25: the FLOPs of a transformer block, counted from its sublayers' real calls, match the textbook count.

    Per sample, with ``s`` tokens, width ``d`` and feed-forward width ``f``: the query, key, value and output
    projections are ``4 * 2*s*d*d``, the scores and the weighted sum ``2 * 2*s*s*d`` (all heads together), the
    feed-forward ``2 * 2*s*d*f``. Biases, norms and the softmax add a few percent at most.
    """
    keras_hub = pytest.importorskip("keras_hub")
    d, f, heads = 32, 128, 4
    tokens = keras.Input((None,), dtype="int32")  # the length is resolved from the sample
    h = keras.layers.Embedding(50, d, name="embed")(tokens)
    h = getattr(keras_hub.layers, kind)(intermediate_dim=f, num_heads=heads, name="block")(h)
    model = keras.Model(tokens, keras.layers.Dense(3, name="out")(h))
    for s in (8, 24):
        graph = build_graph(model, sample=np.zeros((2, s), "int32"))
        matmuls = 4 * 2 * s * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * f
        # The block's own ops (residual adds) and the sublayers decided inside it, each costed on its own.
        # (TensorFlow's TransformerEncoder adds a float16 and a float32 tensor with `+`, which fails: it stays whole.)
        inner = graph.inner.get("block", ())
        block = graph["block"].flops + sum(graph[p].flops for p in inner)
        assert matmuls <= block <= 1.05 * matmuls, (s, block, matmuls)
        if kind == "TransformerDecoder":  # its sublayers are decisions: the cost model sees each one's matmuls
            projections = sum(graph[p].flops for p in inner if graph[p].class_name != "LayerNormalization")
            assert projections >= 0.5 * matmuls
        assert graph["out"].flops == pytest.approx(2 * s * d * 3, rel=0.05)
