"""patches/*.diff apply cleanly to the files of the upstream release each one names.

Each diff's header names the release (``# Upstream: pkg==version``) and the patched
files (``# File: path`` inside the package). The released wheel is downloaded once per
test session without dependencies (``pip download --no-deps``, a few MB) into a pytest
tmp dir; the tests skip only when the package registry cannot be reached.

The WAN and Flux patches are also run: the released Megatron-Bridge model code, patched,
is imported in a subprocess (this file is its script, see ``__main__``) with stand-ins
only for what needs CUDA or is not installed here (Transformer Engine modules ->
megatron-core local modules and a torch-SDPA core attention; diffusers' timestep
embeddings; Bridge's provider base classes), and the DSV model (stage 1: dense attention,
for WAN on cube-ordered tokens) must reproduce the stock model's output and gradients.
"""

import json
import os
import pathlib
import py_compile
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

PATCHES = sorted((pathlib.Path(__file__).parents[1] / "patches").glob("*.diff"))
PIP_TIMEOUT_S = 150


def parse(diff: pathlib.Path):
    """(package, version, header files, files the hunks patch) of one diff."""
    text = diff.read_text()
    upstream = re.findall(r"^# Upstream: ([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)$", text, flags=re.M)
    header_files = re.findall(r"^# File: (\S+)$", text, flags=re.M)
    patched = re.findall(r"^\+\+\+ b/(\S+)$", text, flags=re.M)
    sources = re.findall(r"^--- a/(\S+)$", text, flags=re.M)
    assert len(upstream) == 1, f"{diff.name}: needs exactly one '# Upstream: pkg==version' line"
    assert sources == patched, f"{diff.name}: --- and +++ paths differ"
    return upstream[0][0], upstream[0][1], header_files, patched


def _registry_unreachable(package: str):
    """Why the registry cannot be reached, or None when it answers."""
    url = f"https://pypi.org/simple/{package}/"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15).close()
    except (urllib.error.URLError, OSError) as e:
        return f"{url}: {e}"
    return None


@pytest.fixture(scope="session")
def released_wheel(tmp_path_factory):
    """released_wheel(package, version) -> path of the downloaded wheel (cached per session)."""
    root = tmp_path_factory.mktemp("released")
    cache = {}

    def get(package: str, version: str) -> pathlib.Path:
        key = (package, version)
        if key not in cache:
            dest = root / f"{package}-{version}"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--ignore-requires-python", "--timeout", "20", "--retries", "1", "--quiet",
                   "-d", str(dest), f"{package}=={version}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
                failed = proc.returncode != 0
                why = proc.stderr[-2000:]
            except subprocess.TimeoutExpired:
                failed, why = True, f"pip download took over {PIP_TIMEOUT_S} s"
            wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
            if failed or len(wheels) != 1:
                unreachable = _registry_unreachable(package)
                if not unreachable:
                    pytest.fail(f"pip download {package}=={version} failed although the registry answers:\n{why}")
                # Remembered, so the other tests skip at once instead of waiting for pip again.
                cache[key] = f"package registry unreachable ({unreachable}); cannot fetch {package}=={version}"
            else:
                cache[key] = wheels[0]
        if isinstance(cache[key], str):
            pytest.skip(cache[key])
        return cache[key]

    return get


def extract(wheel: pathlib.Path, files, dest: pathlib.Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [f for f in files if f not in names]
        assert not missing, f"{wheel.name} does not ship {missing}"
        for f in files:
            zf.extract(f, dest)


def apply_patch(diff: pathlib.Path, root: pathlib.Path):
    cmd = (["patch", "-p1", "--fuzz=0", "-i", str(diff)] if shutil.which("patch")
           else ["git", "apply", str(diff)])
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_patch_names_its_release_and_files():
    assert PATCHES, "patches/ holds no .diff"
    for diff in PATCHES:
        package, version, header_files, patched = parse(diff)
        assert header_files == patched, f"{diff.name}: '# File:' lines {header_files} != patched files {patched}"
        assert diff.name.startswith(f"{package}-{version}-"), f"{diff.name}: name must start with {package}-{version}-"


@pytest.mark.parametrize("diff", PATCHES, ids=[p.stem for p in PATCHES])
def test_patch_applies_to_released_package(diff, released_wheel, tmp_path):
    package, version, _, files = parse(diff)
    extract(released_wheel(package, version), files, tmp_path)
    tools = [t for t in ("patch", "git") if shutil.which(t)]
    assert tools, "neither patch nor git is installed"
    if "patch" in tools:  # the command the header documents; --fuzz=0: context must match exactly
        proc = subprocess.run(["patch", "-p1", "--dry-run", "--fuzz=0", "-i", str(diff)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    if "git" in tools:
        proc = subprocess.run(["git", "apply", "--check", str(diff)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    apply_patch(diff, tmp_path)
    for f in files:
        py_compile.compile(str(tmp_path / f), doraise=True)
        assert "dsv" in (tmp_path / f).read_text()


# --------------------------------------------------------------------------- patched models, run
MB_DIFFS = {kind: pathlib.Path(__file__).parents[1] / "patches" / f"megatron-bridge-0.6.2-{kind}-dsv.diff"
            for kind in ("wan", "flux")}
MB_SOURCES = ("megatron/bridge/diffusion/models/common/", "megatron/bridge/diffusion/models/wan/",
              "megatron/bridge/diffusion/models/flux/")


def run_patched(kind, released_wheel, tmp_path, worker=None):
    """Extract the released model code, apply the patch, run ``_worker_<worker or kind>``; its JSON result."""
    diff = MB_DIFFS[kind]
    package, version, _, _ = parse(diff)
    with zipfile.ZipFile(released_wheel(package, version)) as zf:
        zf.extractall(tmp_path, [n for n in zf.namelist() if n.startswith(MB_SOURCES) and n.endswith(".py")])
    apply_patch(diff, tmp_path)
    # TORCHDYNAMO_DISABLE: megatron-core's jit_fuser would torch.compile the adaLN helpers (seconds on CPU).
    # A port of its own: this pytest process may hold a gloo store on the inherited MASTER_PORT.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    proc = subprocess.run([sys.executable, __file__, worker or kind, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_patched_wan_runs_and_matches_stock_wan(released_wheel, tmp_path):
    result = run_patched("wan", released_wheel, tmp_path)
    assert result["core"] == ["DSVDotProductAttention", "TEDotProductAttention"]  # self, cross
    assert result["layout_grid"] == [4, 4, 8]
    assert result["missing"] and all(".full_self_attention.core_attention." in k for k in result["missing"])
    assert result["out_rel_err"] < 1e-5, result
    assert result["grad_rel_err"] < 1e-4, result
    assert "packed THD" in result["packed_error"]
    assert result["core_from_mapping"] == "DSVDotProductAttention"


def test_patched_wan_with_context_parallelism_equals_one_rank(released_wheel, tmp_path):
    """WAN with DSV at context parallel size 2: each rank holds a contiguous share of the cube-ordered video
    (padded when the tokens do not fill whole blocks on every rank); outputs and gradients equal one rank's,
    in stage 1 and stage 2."""
    errors = run_patched("wan", released_wheel, tmp_path, worker="wan_cp")
    assert set(errors) == {f"{grid}-{stage}" for grid, stage in WAN_CP_CASES}
    assert errors["(3, 4, 8)-1"][2] == 128 and errors["(4, 4, 8)-1"][2] == 128   # 96 tokens padded to 2 x 64
    for case, (out_err, grad_err, _, sparse) in errors.items():
        assert out_err < 1e-5 and grad_err < 1e-4, (case, out_err, grad_err)
        assert sparse == case.endswith("-2"), case   # stage 2 ran DSV's sparse CP path, stage 1 dense


def test_patched_flux_runs_and_matches_stock_flux(released_wheel, tmp_path):
    result = run_patched("flux", released_wheel, tmp_path)
    assert result["core"] == ["DSVDotProductAttention", "DSVDotProductAttention"]  # double, single block
    assert result["missing"] and all(".self_attention.core_attention." in k for k in result["missing"])
    assert result["out_rel_err"] < 1e-5, result
    assert result["grad_rel_err"] < 1e-4, result


def _install_stand_ins(root: str, rank: int = 0, world: int = 1, init_method: str = "env://"):
    """Make the extracted Bridge model files importable on a CPU without TE, diffusers or Bridge's deps;
    one gloo process group of `world` ranks, all of them context-parallel."""
    import sys
    import types
    from typing import Generic, TypeVar

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import attention as mcore_attention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv.layers import SDPADotProductAttention

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    # Bridge 0.6.2 passes name= to attention and linear classes; megatron-core 0.16 has no such argument.
    def drop_name(cls):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, name=None, **k: cls.__init__(self, *a, **k)})

    for cls_name in ("SelfAttention", "CrossAttention"):
        setattr(mcore_attention, cls_name, drop_name(getattr(mcore_attention, cls_name)))

    class TEDotProductAttention(SDPADotProductAttention):
        """Stand-in for TE attention: dense torch SDPA, also for a one-sequence THD batch."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            assert packed_seq_params.cu_seqlens_q.numel() == 2 and query.dim() == 3
            out = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), None)
            return out.squeeze(1)

    # megatron-core's TE module imports without TE (placeholders); put CPU stand-ins in their place.
    from megatron.core.extensions import transformer_engine as te_ext

    te_ext.__dict__.update(TEColumnParallelLinear=drop_name(ColumnParallelLinear),
                           TERowParallelLinear=drop_name(RowParallelLinear), TENorm=WrappedTorchNorm,
                           TEDotProductAttention=TEDotProductAttention, SplitAlongDim=None)

    class Timesteps(torch.nn.Module):  # diffusers' sinusoidal timestep features, cos first
        def __init__(self, num_channels, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1.0):
            super().__init__()
            self.half, self.scale = num_channels // 2, scale

        def forward(self, t):
            freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(self.half) / self.half)
            args = self.scale * t.float()[:, None] * freqs[None]
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    class TimestepEmbedding(torch.nn.Module):  # diffusers' two-layer timestep MLP
        def __init__(self, in_channels, time_embed_dim):
            super().__init__()
            self.linear_1 = torch.nn.Linear(in_channels, time_embed_dim)
            self.act = torch.nn.SiLU()
            self.linear_2 = torch.nn.Linear(time_embed_dim, time_embed_dim)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))

    module("diffusers")
    module("diffusers.models")
    module("diffusers.models.embeddings", Timesteps=Timesteps, TimestepEmbedding=TimestepEmbedding)

    # Bridge's package __init__ files pull in the whole library: load the model files directly.
    for pkg in ("megatron.bridge", "megatron.bridge.diffusion", "megatron.bridge.diffusion.models",
                "megatron.bridge.diffusion.models.common", "megatron.bridge.diffusion.models.wan",
                "megatron.bridge.diffusion.models.flux"):
        module(pkg, __path__=[os.path.join(root, *pkg.split("."))])
    T = TypeVar("T")

    class ModelProviderMixin(Generic[T]):
        pass

    module("megatron.bridge.models", __path__=[])
    module("megatron.bridge.models.model_provider", ModelProviderMixin=ModelProviderMixin)
    module("megatron.bridge.models.transformer_config", TransformerConfig=TransformerConfig)

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init_method)
    parallel_state.initialize_model_parallel(context_parallel_size=world)


def _compare(stock, dsv, run):
    """Load stock's weights into dsv, run both (run(model) -> output, loss); errors and missing keys."""
    import torch

    missing, unexpected = dsv.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected, unexpected
    outs, grads = [], []
    shared = dict(stock.named_parameters())
    for model in (stock, dsv):
        model.train()
        out, loss = run(model)
        loss.backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in shared]))
    return {"missing": missing,
            "out_rel_err": float((outs[1] - outs[0]).norm() / outs[0].norm()),
            "grad_rel_err": float((grads[1] - grads[0]).norm() / grads[0].norm())}


WAN_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, crossattn_emb_size=64,
                 text_dim=32, freq_dim=16, in_channels=4, out_channels=4, patch_spatial=1, patch_temporal=1,
                 use_cpu_initialization=True, apply_rope_fusion=False)
WAN_DSV = dict(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=4)


def _wan_packed(lengths, text_len: int):
    """WAN's packed_seq_params (THD) for videos of `lengths` tokens and one caption of text_len tokens."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cu_kv = torch.tensor([0, text_len], dtype=torch.int32)
    return {"self_attention": PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv=cu,
                                              cu_seqlens_kv_padded=cu, qkv_format="thd"),
            "cross_attention": PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv=cu_kv,
                                               cu_seqlens_kv_padded=cu_kv, qkv_format="thd")}


def _worker_wan(root: str):
    """Stock and DSV WAN built through the patched provider, on one video; print one JSON line."""
    _install_stand_ins(root)
    import torch

    from megatron.bridge.diffusion.models.wan.wan_provider import WanModelProvider
    from megatron_dsv import DSVConfig

    shape = WAN_SHAPE
    torch.manual_seed(0)
    stock = WanModelProvider(**shape).provide()
    dsv = WanModelProvider(**shape, dsv=DSVConfig(**WAN_DSV)).provide()

    grid, text_len = (4, 4, 8), 7
    s = grid[0] * grid[1] * grid[2]
    x, t, context = torch.randn(s, 1, 4), torch.tensor([0.3]), torch.randn(text_len, 1, 32)
    probe = torch.randn(s, 1, 4)  # a loss that depends on token order

    def run(model):
        out = model(x, grid_sizes=torch.tensor([grid]), t=t, context=context, packed_seq_params=_wan_packed([s], text_len))
        return out, (out * probe).sum()

    result = _compare(stock, dsv, run)
    try:
        dsv(torch.randn(2 * s, 1, 4), grid_sizes=torch.tensor([grid, grid]), t=t, context=context,
            packed_seq_params=_wan_packed([s, s], text_len))
        result["packed_error"] = ""
    except NotImplementedError as e:
        result["packed_error"] = str(e)
    layer = dsv.decoder.layers[0]
    result["core"] = [type(layer.full_self_attention.core_attention).__name__,
                      type(layer.cross_attention.core_attention).__name__]
    result["layout_grid"] = list(dsv._dsv_layout.grid)
    # A config reloaded from YAML holds the DSV settings as a mapping.
    as_dict = WanModelProvider(**shape, dsv={"rank": 4, "block_q": 32, "cube": [2, 4, 4], "block_kv": 32}).provide()
    result["core_from_mapping"] = type(as_dict.decoder.layers[0].full_self_attention.core_attention).__name__
    print(json.dumps(result))


WAN_CP_CASES = [((4, 4, 8), 1), ((4, 4, 8), 2), ((3, 4, 8), 1), ((3, 4, 8), 2)]  # (grid, stage); 96 tokens: padded


def _wan_cp_run(provider_kwargs, grid, stage, shard=None):
    """One forward + backward of the DSV WAN on one video of `grid` (every rank builds the same model and data);
    with `shard` (megatron_dsv.video.CPShard) the rank feeds its share. Returns (out, parameter grads)."""
    import torch

    from megatron.bridge.diffusion.models.wan.wan_provider import WanModelProvider

    torch.manual_seed(0)
    model = WanModelProvider(**provider_kwargs).provide()
    with torch.no_grad():   # WAN zero-initialises its head: give it weights so the output shows the attention
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    if stage == 2:   # per-head budgets given, as a profile would: block sparsity 0.5 and 0.75
        for layer in model.decoder.layers:
            ctl = layer.full_self_attention.core_attention.controller
            state = ctl.state_dict()
            state["stage"].fill_(2)
            state["block_sparsity"].copy_(torch.tensor([0.5, 0.75]))
            ctl.load_state_dict(state)
    gen = torch.Generator().manual_seed(sum(grid) + stage)
    s, text_len = grid[0] * grid[1] * grid[2], 7
    x, probe = torch.randn(s, 1, 4, generator=gen), torch.randn(s, 1, 4, generator=gen)
    t, context = torch.tensor([0.3]), torch.randn(text_len, 1, 32, generator=gen)
    params = _wan_packed([s], text_len)
    if shard is not None:
        x, probe = shard.shard(x), shard.shard(probe)
    model.train()
    out = model(x, grid_sizes=torch.tensor([grid]), t=t, context=context, packed_seq_params=params)
    (out * probe).sum().backward()
    sparse = all(layer.full_self_attention.core_attention.last_used_sparse for layer in model.decoder.layers)
    return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), sparse


def _wan_cp_rank(rank, world, root, port, ref_path, out_path):
    import torch
    import torch.distributed as dist

    _install_stand_ins(root, rank=rank, world=world, init_method=f"tcp://127.0.0.1:{port}")
    from megatron_dsv.video import CPShard

    refs, errors = torch.load(ref_path), {}
    for grid, stage in WAN_CP_CASES:
        shard = CPShard(grid, WAN_DSV["cube"], world, rank, WAN_DSV["block_q"])
        out, grads, sparse = _wan_cp_run(dict(WAN_SHAPE, context_parallel_size=world, dsv=WAN_DSV), grid, stage,
                                         shard)
        dist.all_reduce(grads)   # replicated parameters: their gradients are the sum over the ranks' tokens
        ref_out, ref_grads, ref_sparse = refs[f"{grid}-{stage}"]
        ref_out = shard.shard(ref_out)   # the one-rank model returns raster order
        valid = torch.arange(shard.s_local) + rank * shard.s_local < shard.num_tokens   # not DSV's padding
        errors[f"{grid}-{stage}"] = [float((out - ref_out)[valid].norm() / ref_out[valid].norm()),
                                     float((grads - ref_grads).norm() / ref_grads.norm()), shard.total,
                                     sparse and ref_sparse]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(errors, f)


def _worker_wan_cp(root: str):
    """The DSV WAN with context parallelism 2 (two gloo ranks) against one rank: outputs and parameter gradients,
    stage 1 (dense CP attention) and stage 2 (sparse), a grid that fills whole blocks and one that is padded."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    _install_stand_ins(root)
    tmp = tempfile.mkdtemp()
    ref_path, out_path = os.path.join(tmp, "ref.pt"), os.path.join(tmp, "errors.json")
    torch.save({f"{grid}-{stage}": _wan_cp_run(dict(WAN_SHAPE, dsv=WAN_DSV), grid, stage)
                for grid, stage in WAN_CP_CASES}, ref_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_wan_cp_rank, args=(2, root, port, ref_path, out_path), nprocs=2, join=True)
    with open(out_path) as f:
        print(json.dumps(json.load(f)))


def _worker_flux(root: str):
    """Stock and DSV Flux built through the patched provider; print one JSON line."""
    _install_stand_ins(root)
    import torch

    from megatron.bridge.diffusion.models.flux.flux_provider import FluxProvider
    from megatron_dsv import DSVConfig

    shape = dict(num_joint_layers=1, num_single_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                 in_channels=4, context_dim=16, model_channels=16, vec_in_dim=8, axes_dims_rope=[8, 12, 12])
    torch.manual_seed(0)
    stock = FluxProvider(**shape).provide()
    dsv = FluxProvider(**shape, dsv=DSVConfig(rank=4, block_q=32, cube=(1, 4, 8), block_kv=32,
                                              sample_stride=4)).provide()
    b, h, w, text_len = 1, 8, 8, 16
    img, txt = torch.randn(h * w, b, 4), torch.randn(text_len, b, 16)
    rows, cols = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, h * w, 3).expand(b, -1, -1)
    txt_ids = torch.zeros(b, text_len, 3)
    probe = torch.randn(h * w, b, 4)

    def run(model):
        out = model(img, txt=txt, y=torch.randn(b, 8, generator=torch.Generator().manual_seed(1)),
                    timesteps=torch.tensor([0.4]), img_ids=img_ids, txt_ids=txt_ids)
        return out, (out * probe).sum()

    result = _compare(stock, dsv, run)
    result["core"] = [type(dsv.double_blocks[0].self_attention.core_attention).__name__,
                      type(dsv.single_blocks[0].self_attention.core_attention).__name__]
    print(json.dumps(result))


if __name__ == "__main__":
    {"wan": _worker_wan, "wan_cp": _worker_wan_cp, "flux": _worker_flux}[sys.argv[1]](sys.argv[2])
