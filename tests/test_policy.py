import json

import keras
import pytest

from autoprec import PrecisionPolicy
from autoprec.errors import ModelMismatchError, PolicyError, SchemaError


def make_policy():
    return PrecisionPolicy(
        {"h1": "mixed_float16", "h2": "mixed_bfloat16", "out": "float32", "wide": "float64"},
        target="mixed_float16",
        layers={
            "h1": {"class": "Dense", "params": 100, "flops": 300.0},
            "h2": {"class": "Dense", "params": 50, "flops": 100.0},
            "out": {"class": "Dense", "params": 50, "flops": 100.0},
            "wide": {"class": "Dense", "params": 0, "flops": 0.0},
        },
    )


def test_mapping_and_summary():
    p = make_policy()
    assert p["h1"] == "mixed_float16" and len(p) == 4
    assert p.counts() == {"mixed_float16": 1, "mixed_bfloat16": 1, "float32": 1, "float64": 1}
    share = p.low_precision_share()
    assert share["params"] == pytest.approx(150 / 200)
    assert share["flops"] == pytest.approx(400 / 500)
    assert "16-bit share of FLOPs" in p.summary()
    assert repr(p).startswith("PrecisionPolicy(4 layers")
    assert p.uses_float16


def test_immutable():
    p = make_policy()
    with pytest.raises(TypeError):
        p["h1"] = "float32"  # type: ignore[index]
    q = p.replace({"h1": "float32"})
    assert p["h1"] == "mixed_float16" and q["h1"] == "float32"


def test_json_round_trip(tmp_path):
    p = make_policy()
    path = tmp_path / "policy.json"
    p.save(path)
    q = PrecisionPolicy.load(path)
    assert q == p
    assert q.layers == p.layers
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 2 and doc["keras_version"] == keras.__version__
    assert doc["target"] == "mixed_float16" and "autoprec_version" in doc


def test_to_keras_has_explicit_default_and_survives_config():
    m = make_policy().to_keras()
    assert m.default_policy.name == "float32"
    restored = keras.dtype_policies.DTypePolicyMap.from_config(m.get_config())
    assert restored["h1"].name == "mixed_float16" and restored["h2"].name == "mixed_bfloat16"
    assert PrecisionPolicy.from_keras(restored, target="mixed_float16") == make_policy()


@pytest.mark.parametrize("name", ["float16", "int8", "", None, "mixed_float8"])
def test_unknown_policy_name(name):
    with pytest.raises(PolicyError, match="Expected a policy"):
        PrecisionPolicy({"a": name})


def test_float16_hint_names_mixed():
    with pytest.raises(PolicyError, match="mixed_float16"):
        PrecisionPolicy({"a": "float16"})


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        PrecisionPolicy.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(SchemaError, match="does not exist"):
        PrecisionPolicy.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(layers={"a": 1}), "'layers' to be a list"),
        (lambda d: d["layers"].append({"path": "x", "policy": "float8"}), "policy should be one of"),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "appears twice"),
        (lambda d: d["layers"][0].update(params=-3), "params should be a finite number"),
        (lambda d: d["layers"][0].update(keras_path=3), "keras_path should be a string"),
        (lambda d: d.update(schema_version=True), "schema_version"),
        (lambda d: d.update(target="float16"), "target"),
        (lambda d: d.update(provenance=[1]), "'provenance' to be an object"),
        (lambda d: d.update(provenance={"drop": [0.1]}), "provenance.drop"),
        (lambda d: d.update(provenance={"holdout": {"drop": {"deep": 1}}}), "provenance.holdout"),
    ],
)
def test_schema_violations(tmp_path, mutate, message):
    doc = make_policy().to_json_dict()
    mutate(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match=message):
        PrecisionPolicy.load(path)


def test_provenance_round_trips_and_stays_immutable(tmp_path):
    provenance = {"metric": "accuracy", "drop": 0.0031, "drop_bound": 0.0046, "confidence": 0.95, "holdout": None}
    policy = PrecisionPolicy({"a": "mixed_float16"}, target="mixed_float16", provenance=provenance)
    policy.save(tmp_path / "p.json")
    loaded = PrecisionPolicy.load(tmp_path / "p.json")
    assert loaded.provenance == provenance
    assert loaded.replace({"a": "float32"}).provenance == provenance
    loaded.provenance["drop"] = 1.0  # a copy: the policy is unchanged
    assert loaded.provenance["drop"] == 0.0031
    with pytest.raises(PolicyError, match="provenance.drop"):
        PrecisionPolicy({"a": "float32"}, provenance={"drop": float("nan")})
    assert "provenance" not in PrecisionPolicy({"a": "float32"}).to_json_dict()  # a hand-written policy has none


def _graph(*names, cls=keras.layers.Dense):
    from autoprec.graph import build_graph

    i = keras.Input((4,))
    x = i
    for name in names:
        x = cls(4, name=name)(x) if cls is keras.layers.Dense else cls(name=name)(x)
    return build_graph(keras.Model(i, x))


def test_for_graph_names_missing_extra_and_changed():
    p = PrecisionPolicy(
        {"h1": "mixed_float16", "h2": "float32"}, layers={"h1": {"class": "Dense"}, "h2": {"class": "Dense"}}
    )
    with pytest.raises(ModelMismatchError, match="in the policy but not in the model: 'h2'") as info:
        p.for_graph(_graph("h1", "other"))
    assert "in the model but not in the policy: 'other'" in str(info.value)
    q = PrecisionPolicy({"h1": "mixed_float16"}, layers={"h1": {"class": "Conv2D"}})
    with pytest.raises(ModelMismatchError, match="another class"):
        q.for_graph(_graph("h1"))
    assert PrecisionPolicy({"h1": "mixed_float16"}).for_graph(_graph("h1", "h2")) == {"h1": "mixed_float16"}


def test_get_config_round_trip_and_get():
    p = make_policy()
    assert PrecisionPolicy.from_config(p.get_config()) == p
    assert PrecisionPolicy.from_config(json.loads(json.dumps(p.get_config()))).layers == p.layers
    assert PrecisionPolicy.get(p.get_config()) == p and PrecisionPolicy.get(p) is p


def test_load_and_save_paths_are_checked(tmp_path):
    from autoprec.errors import OutputError

    with pytest.raises(SchemaError, match="is a directory"):
        PrecisionPolicy.load(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        make_policy().save(tmp_path / "afile" / "p.json")
    with pytest.raises(OutputError, match="does not exist"):
        make_policy().save(tmp_path / "missing" / "p.json")
    with pytest.raises(OutputError, match="directory of that name"):
        make_policy().save(tmp_path)


def test_version_1_files_are_read_and_quantized_names_need_version_2(tmp_path):
    doc = make_policy().to_json_dict()
    doc["schema_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    assert PrecisionPolicy.load(tmp_path / "v1.json") == make_policy()  # migration: a version-1 file reads as it was
    doc["layers"].append({"path": "q", "policy": "int8_from_mixed_bfloat16"})
    (tmp_path / "v1q.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="policy should be one of"):
        PrecisionPolicy.load(tmp_path / "v1q.json")
    doc["schema_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(doc))
    policy = PrecisionPolicy.load(tmp_path / "v2.json")
    assert policy.quantized == {"q": "int8_from_mixed_bfloat16"}


@pytest.mark.parametrize(
    "name", ["int8_from_float32", "int8_from_mixed_bfloat16", "int4_from_mixed_float16", "float8_from_mixed_bfloat16"]
)
def test_quantized_names_are_keras_policies(name):
    assert PrecisionPolicy({"a": name})["a"] == name
    assert keras.dtype_policies.get(name).quantization_mode == name.split("_from_")[0]


def test_int8_with_float16_compute_is_refused_as_keras_does():
    with pytest.raises(PolicyError, match="quantized"):
        PrecisionPolicy({"a": "int8_from_mixed_float16"})
