"""Metrics dict, TensorBoard/W&B logging and the heatmap plot."""

import pytest
import torch
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_dsv import DSVConfig
from megatron_dsv.layers import append_jsonl, dsv_layers, dsv_metrics, get_dsv_layer_spec, log_dsv_metrics
from megatron_dsv.plot import load_record, main as plot_main
from test_layer import SMALL, tconfig


class ScalarWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


class RunLogger:
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((data, step))


@pytest.fixture
def trained_metrics(megatron_parallel, tmp_path):
    block = TransformerBlock(tconfig(), get_dsv_layer_spec(DSVConfig(**SMALL)))
    log = tmp_path / "dsv.jsonl"
    for step in range(2):
        x = torch.randn(64, 1, 64, requires_grad=True)
        block(x, attention_mask=None).sum().backward()
        append_jsonl(str(log), dsv_metrics(block), step)
    return log


def test_writers_get_per_layer_scalars(trained_metrics):
    metrics = load_record(str(trained_metrics))
    tb, wandb = ScalarWriter(), RunLogger()
    log_dsv_metrics(metrics, tb, step=7)
    log_dsv_metrics(metrics, wandb, step=7)
    assert tb.scalars["dsv/stage"] == (1, 7)
    assert 0.0 <= tb.scalars["dsv/layer00/token_sparsity"][0] <= 1.0
    assert "dsv/layer01/recall" in tb.scalars and "dsv/layer01/budget" in tb.scalars
    assert wandb.logged[0][1] == 7 and set(wandb.logged[0][0]) == set(tb.scalars)
    with pytest.raises(ValueError, match="writer must be"):
        log_dsv_metrics(metrics, object(), step=0)


def test_plot_writes_png(trained_metrics, tmp_path):
    out = tmp_path / "p.png"
    plot_main([str(trained_metrics), "--out", str(out), "--step", "1"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no record for step 9"):
        load_record(str(trained_metrics), 9)


def test_plot_bad_logs(trained_metrics, tmp_path, capsys):
    """A log cut short in its last line (a killed run) still plots; other bad logs are named, not tracebacks."""
    import json

    lines = trained_metrics.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines) + "\n" + lines[-1][:70])
    n = len(lines) + 1
    assert load_record(str(cut)) == json.loads(lines[-1]) and f"line {n} is cut short" in capsys.readouterr().err
    resumed = json.loads(lines[-1])   # a resumed run appends: its record starts on a line of its own
    append_jsonl(str(cut), {k: v for k, v in resumed.items() if k != "step"}, step=99)
    assert load_record(str(cut))["step"] == 99 and f"line {n} is cut short" in capsys.readouterr().err
    bad = {"progress.jsonl": json.dumps({"step": 1, "loss": 0.5}), "empty.jsonl": "", "garbage.jsonl": "{not json"}
    messages = {"progress.jsonl": "not a DSV metrics record", "empty.jsonl": "no record", "garbage.jsonl": "no record"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=messages[name]):
            plot_main([str(tmp_path / name)])
    with pytest.raises(SystemExit, match="No such file"):
        plot_main([str(tmp_path / "missing.jsonl")])
    no_layers = json.loads(lines[-1])
    no_layers["layers"] = []
    (tmp_path / "no_layers.jsonl").write_text(json.dumps(no_layers))
    with pytest.raises(SystemExit, match="holds no DSV layer"):
        plot_main([str(tmp_path / "no_layers.jsonl")])
    unprofiled = json.loads(lines[-1])
    unprofiled["summary"]["recall"] = None
    (tmp_path / "unprofiled.jsonl").write_text(json.dumps(unprofiled))
    plot_main([str(tmp_path / "unprofiled.jsonl"), "--out", str(tmp_path / "noext")])
    assert (tmp_path / "noext.png").is_file() and capsys.readouterr().out.strip().endswith("noext.png")


def test_the_layers_found_once_read_as_the_model(megatron_parallel):
    """A training loop finds the DSV layers once (dsv_layers) and reads the metrics of that list every step:
    the list is taken as it is, and its metrics are the model's."""
    block = TransformerBlock(tconfig(), get_dsv_layer_spec(DSVConfig(**SMALL)))
    block(torch.randn(64, 1, 64, requires_grad=True), attention_mask=None).sum().backward()
    layers = dsv_layers(block)
    assert len(layers) == tconfig().num_layers and dsv_layers(layers) == layers
    untimed = lambda m: [{k: v for k, v in l.items() if not k.endswith("_ms")} for l in m["layers"]]  # noqa: E731
    assert untimed(dsv_metrics(layers)) == untimed(dsv_metrics(block))
