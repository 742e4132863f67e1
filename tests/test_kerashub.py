"""KerasHub models as users fine-tune them: built from a config (no download), trained briefly, tuned.

Six backbone families of four kinds (decoder-only language models, encoders, a vision
transformer, an encoder-decoder), each with its task head and ``preprocessor=None``,
tuned for float16 and for bfloat16 under a 0.5% budget. What a user relies on:

- the drop Keras measures on the tuned model is within the budget;
- at least 90% of the Dense/EinsumDense kernel parameters, counted over every sublayer by
  the ``compute_dtype`` Keras really uses in ``result.model``, compute in 16-bit;
- the cost model sees the blocks' matmuls (estimated GPU speed-up > 1.2);
- ``save`` and ``load_model`` give identical predictions and dtypes;
- the report lists the sublayers, pinned ones marked.
"""

import numpy as np
import pytest
from conftest import check_tuned

keras_hub = pytest.importorskip("keras_hub")
import keras  # noqa: E402

import autoprec  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB, SEQ, WIDTH = 64, 16, 32


def _tokens(rng, n):
    """A learnable language task: each next token is the previous one plus one."""
    seq = (rng.integers(0, VOCAB, size=(n, 1)) + np.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1].astype("int32"), seq[:, 1:].astype("int32")


def _lm(rng, n):
    x, y = _tokens(rng, n)
    return {"token_ids": x, "padding_mask": np.ones_like(x)}, y


def _classify(rng, n, segments=False):
    ids = rng.integers(1, VOCAB, size=(n, SEQ)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if segments:
        x["segment_ids"] = np.zeros_like(ids)
    return x, (ids[:, 0] > VOCAB // 2).astype("int32")


def _seq2seq(rng, n):
    x, y = _tokens(rng, n)
    ones = np.ones_like(x)
    return {
        "encoder_token_ids": x,
        "encoder_padding_mask": ones,
        "decoder_token_ids": x,
        "decoder_padding_mask": ones,
    }, y


def _images(rng, n):
    x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    return x, (x[:, :8].mean(axis=(1, 2, 3)) > 0).astype("int32")


def _build(family):
    m = keras_hub.models
    text = dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=WIDTH, intermediate_dim=2 * WIDTH)
    if family == "gpt2":
        bb = m.GPT2Backbone(num_heads=2, max_sequence_length=SEQ, **text)
        return m.GPT2CausalLM(backbone=bb, preprocessor=None), _lm
    if family == "llama":
        bb = m.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **text)
        return m.LlamaCausalLM(backbone=bb, preprocessor=None), _lm
    if family == "bert":
        bb = m.BertBackbone(num_heads=2, max_sequence_length=SEQ, **text)
        return m.BertTextClassifier(backbone=bb, num_classes=2, preprocessor=None), lambda r, n: _classify(r, n, True)
    if family == "roberta":
        bb = m.RobertaBackbone(num_heads=2, max_sequence_length=SEQ, **text)
        return m.RobertaTextClassifier(backbone=bb, num_classes=2, preprocessor=None), _classify
    if family == "vit":
        bb = m.ViTBackbone(
            image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=WIDTH, mlp_dim=64
        )
        return m.ViTImageClassifier(backbone=bb, num_classes=2, preprocessor=None), _images
    if family == "bart":
        bb = m.BartBackbone(num_heads=2, max_sequence_length=SEQ, **text)
        return m.BartSeq2SeqLM(backbone=bb, preprocessor=None), _seq2seq
    raise AssertionError(family)


FAMILIES = ["gpt2", "llama", "bert", "roberta", "vit", "bart"]
_TRAINED: dict = {}


def _trained(family):
    if family not in _TRAINED:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        model, data = _build(family)
        x, y = data(rng, 1024)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x, y, epochs=3, batch_size=64, verbose=0)  # 48 steps learn these tasks
        _TRAINED[family] = (model, data(rng, 256))
    return _TRAINED[family]


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kerashub_models_tune_emit_reload_and_report(family, target, tmp_path):
    model, (x, y) = _trained(family)
    result = autoprec.tune(model, (x, y), budget="0.5%", target=target, device="gpu", n_trials=8, seed=0, verbose=0)
    report = check_tuned(model, result, x, y, tmp_path)
    assert "## Inside the blocks" in report
    sub = result.sublayers
    assert len(sub) > 0 and set(sub["computes"]) & {target}
    if family == "llama":  # KerasHub hard-codes the attention softmax to float32: pinned, never lowered
        pinned = sub[sub["class"] == "Softmax"]
        assert len(pinned) and pinned["pinned"].all() and (pinned["computes"] == "float32").all()
        assert "pinned: the layer fixes its own dtype" in report


def test_a_hazard_inside_a_block_keeps_only_its_sublayers_in_float32(tmp_path):
    """Decisions inside blocks: a float16 overflow planted in the first block's attention values (their output
    projection scaled back, so the float32 model is unchanged) costs two sublayers, not the block.

    The value projection overflows, and the output projection reads the overflowing sum: both stay float32; the
    query, key, norms and feed-forward layers of that block, and every other block, compute in float16. The
    simulated drop of the mixed block is the real one, and the tuned model reloads as it is.
    """
    from autoprec.apply import copy_with_policies
    from autoprec.graph import resolved_policy

    trained, (x, y) = _trained("gpt2")
    model = copy_with_policies(trained, {})  # the cached model stays as the other tests know it
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    attention = model.backbone.get_layer("transformer_layer_0")._self_attention_layer
    value, output = attention._value_dense, attention._output_dense
    value.kernel.assign(value.kernel.numpy() * 1e7)
    value.bias.assign(value.bias.numpy() * 1e7)
    output.kernel.assign(output.kernel.numpy() / 1e7)
    result = autoprec.tune(model, (x, y), budget="0.5%", target="mixed_float16", device="gpu", seed=0, verbose=0)
    computes = {
        layer.path: resolved_policy(layer)
        for layer in result.model._flatten_layers()
        if getattr(layer, "path", None) and type(layer).__name__ in ("EinsumDense", "Dense", "LayerNormalization")
    }
    kept = {p for p, name in computes.items() if name == "float32"}
    assert kept == {value.path, output.path}, kept
    real = result.model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
    assert model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] - real <= 0.005
    check = result.verification["checks"][-1]
    if check["simulated_drop"] is not None:
        assert abs(check["simulated_drop"] - check["real_drop"]) <= 2 / (len(x) * 16)
    report = check_tuned(model, result, x, y, tmp_path, exempt=(value.path, output.path))
    assert "transformer_layer_0/self_attention/value" in report


def test_a_padded_language_model_is_tuned_from_the_shell_on_its_real_tokens(tmp_path):
    """A KerasHub causal LM on sequences of different lengths, from a ``.keras`` file and an .npz holding its
    named inputs and the padding mask as ``sample_weight`` (what KerasHub's preprocessor yields): the metric and
    the budget count the real tokens, as Keras's weighted evaluate does on the tuned model."""
    import json

    from autoprec.cli import EXIT_OK, main

    trained, (x, y) = _trained("gpt2")
    rng = np.random.default_rng(5)
    mask = (np.arange(SEQ)[None] < rng.integers(4, SEQ + 1, size=len(y))[:, None]).astype("int32")
    x = {"token_ids": x["token_ids"] * mask, "padding_mask": mask}
    y = np.where(mask > 0, y, rng.integers(0, VOCAB, size=y.shape)).astype("int32")  # the padding's labels: noise
    trained.save(tmp_path / "lm.keras")
    np.savez(tmp_path / "val.npz", **{f"x/{k}": v for k, v in x.items()}, y=y, sample_weight=mask)
    out = tmp_path / "run"
    argv = ["tune", str(tmp_path / "lm.keras"), "--data", str(tmp_path / "val.npz"), "--budget", "0.5%"]
    assert main([*argv, "--target", "mixed_float16", "--seed", "0", "-o", str(out), "--verbose", "0"]) == EXIT_OK
    verification = json.loads((out / "result.json").read_text())["verification"]
    assert (verification["counted"], verification["unit"], verification["weighted"]) == (int(mask.sum()), "token", True)
    tuned = keras.saving.load_model(out / "model.keras")
    tuned.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"])
    trained_copy = keras.saving.load_model(tmp_path / "lm.keras")
    trained_copy.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"]
    )
    real, base = (
        m.evaluate(x, y, sample_weight=mask, verbose=0, return_dict=True)["accuracy"] for m in (tuned, trained_copy)
    )
    assert base - real <= 0.005 + 1e-6
    assert (
        f"the metric averages over the {int(mask.sum())} tokens weighed above zero" in (out / "report.md").read_text()
    )
