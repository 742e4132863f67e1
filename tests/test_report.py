import html
import html.parser
import itertools
import json
import re
import shutil

import keras
import numpy as np
import pytest
from conftest import small_data

import autoprec
from autoprec.report import pages as report
from autoprec.report import plots


@pytest.fixture(scope="module")
def run(planted, tmp_path_factory):
    model, _, val, _ = planted
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_float16", n_trials=15, verbose=0)
    directory = tmp_path_factory.mktemp("run")
    result.save(directory)
    return result, directory


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                self.urls.append(value)


def test_markdown_matches_result(run):
    result, directory = run
    text = (directory / "report.md").read_text()
    assert f"{result.baseline_metric:.6g}" in text and f"{result.metric:.6g}" in text
    assert result.formula in html.unescape(text.replace("\\_", "_"))  # Markdown-escaped, renders as the formula
    assert f"{result.speedup_estimate:.2f}x" in text
    rows = {
        line.split("|")[2].strip().strip("`"): line
        for line in text.splitlines()
        if line.startswith("| ") and "`" in line
    }
    assert set(rows) == set(result.sensitivity["path"])
    sens = result.sensitivity.set_index("path")
    drop_points = f"{sens.loc['d3', 'metric_drop'] * 100:.2g} points"
    assert "float32: alone in float16 it drops accuracy by " + drop_points in rows["d3"]
    assert "&gt; 65504" in rows["d3"]
    assert "mixed\\_float16: no measurable drop" in rows["d1"]
    assert "outputs stay float32" in rows["out"]


def test_html_is_self_contained_and_parses(run):
    _, directory = run
    text = (directory / "report.html").read_text()
    parser = _Collector()
    parser.feed(text)
    assert "table" in parser.tags and parser.tags.count("img") >= 4
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert not re.search(r"https?://", text)
    assert "<script" not in text and "<link" not in text


def test_plots_written_and_data_consistent(run):
    result, directory = run
    for name in ("precision_strip", "sensitivity", "ranges", "history", "tradeoff"):
        assert (directory / f"{name}.png").stat().st_size > 5000
    saved = report.load_saved(directory)
    history = plots.history_data(saved)["best_speedup"]
    assert all(b >= a for a, b in itertools.pairwise(history))
    assert history[-1] == pytest.approx(result.speedup_estimate, rel=1e-6) or history[-1] >= result.speedup_estimate
    trade = plots.tradeoff_data(saved)
    assert trade["allowed"] == pytest.approx(0.005) and trade["chosen"][0] == pytest.approx(result.speedup_estimate)
    strip = plots.strip_data(saved)
    assert len(strip["paths"]) == len(result.sensitivity)
    ranges = plots.ranges_data(saved)
    assert ranges["limits"]["largest finite"] == 65504.0


def test_regenerates_from_saved_files_alone(run, tmp_path):
    _, directory = run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("result.json", "sensitivity.csv", "trials.csv", "policy.json"):
        shutil.copy(directory / name, copy / name)
    paths = report.write_report(copy)
    assert (copy / "report.html").exists() and (copy / "report.md").exists()
    assert (copy / "report.md").read_text() == (directory / "report.md").read_text()
    assert len(paths) >= 7


def test_layer_names_are_escaped(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    # TensorFlow's scope names allow '>' but not '<'; the metric's name '<lambda>' brings the rest.
    h = keras.layers.Dense(16, activation="relu", name="a>b_1")(inputs)
    out = keras.layers.Dense(3, activation="softmax", name="head_x")(h)
    model = keras.Model(inputs, out)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = small_data(200)
    model.fit(x, y, epochs=20, verbose=0)
    # A lambda on purpose (hence the noqa): its name, "<lambda>", is the markup the report must escape.
    metric = lambda yt, yp: float(np.mean(np.argmax(yp, -1) == yt))  # noqa: E731
    result = autoprec.tune(
        model, (x, y), budget="5%", metric=metric, higher_is_better=True, target="mixed_bfloat16", n_trials=3, verbose=0
    )
    result.save(tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert "a&gt;b_1" in text and "a>b_1" not in text
    assert "&lt;lambda&gt;" in text and "<lambda>" not in text
    parser = _Collector()
    parser.feed(text)
    assert all(u.startswith("data:") for u in parser.urls)
    md = (tmp_path / "report.md").read_text()
    assert "<lambda>" not in md and "&lt;lambda&gt;" in md


def test_training_plot_when_checked(digits_cnn, tmp_path):
    model, train, val = digits_cnn
    result = autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_float16",
        n_trials=6,
        verify="train",
        train_data=train,
        steps=20,
        verbose=0,
    )
    result.save(tmp_path)
    assert (tmp_path / "training.png").exists()
    meta = json.loads((tmp_path / "result.json").read_text())
    assert len(meta["training"]["tuned_losses"]) == 20
    assert "## Training check" in (tmp_path / "report.md").read_text()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(autoprec.errors.DataError, match="lacks"):
        report.write_report(tmp_path)
