"""The README tells the truth about DSVConfig and the two commands."""

import dataclasses
import pathlib
import re

from megatron_dsv import DSVConfig

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
CI = (pathlib.Path(__file__).parents[1] / ".ci" / "run").read_text()


def test_every_knob_documented_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| `--dsv-[\w-]+` \| `([^`]*)` \|", README, flags=re.M))
    fields = {f.name: f.default for f in dataclasses.fields(DSVConfig)}
    assert set(rows) == set(fields)
    for name, default in fields.items():
        assert rows[name] == repr(default), name


def test_ci_runs_the_readme_commands():
    install = re.search(r"```bash\n(pip install [^\n&]+) &&", README).group(1)
    test = re.search(r"## Run the tests\n\n```bash\n([^\n]+)\n```", README).group(1)
    assert install.replace("pip install", "pip install -q") in CI
    assert test in CI


def test_readme_apply_dsv_example_runs(megatron_parallel):
    import torch

    code = re.search(r"## Use it in a Megatron model\n\n.*?```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(code, scope)
    block = scope["block"]
    x = torch.randn(256, 1, scope["config"].hidden_size, requires_grad=True)
    block(x, attention_mask=None).sum().backward()
    assert type(block.layers[0].self_attention.core_attention).__name__ == "DSVDotProductAttention"
    assert x.grad is not None


def test_every_python_snippet_runs_as_written(megatron_parallel):
    """Each python block of the README runs on its own. Prelude: torch.distributed and Megatron's
    parallel_state initialised (the fixture), as in any Megatron program; blocks that import a package
    this environment lacks (megatron.bridge needs Python 3.12) are skipped, and said so."""
    import importlib.util

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 5
    ran = 0
    for code in blocks:
        needs = re.findall(r"^from (megatron\.bridge)\S* import", code, re.M)
        if needs and importlib.util.find_spec(needs[0]) is None:
            continue
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        ran += 1
    assert ran >= 4
