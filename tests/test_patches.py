"""patches/*.diff apply cleanly to the files of the upstream release each one names.

Each diff's header names the release (``# Upstream: pkg==version``) and the patched
files (``# File: path`` inside the package). The released wheel is downloaded once per
test session without dependencies (``pip download --no-deps``, a few MB) into a pytest
tmp dir; the tests skip only when the package registry cannot be reached.
"""

import pathlib
import py_compile
import re
import shutil
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
                if unreachable:
                    pytest.skip(f"package registry unreachable ({unreachable}); cannot fetch {package}=={version}")
                pytest.fail(f"pip download {package}=={version} failed although the registry answers:\n{why}")
            cache[key] = wheels[0]
        return cache[key]

    return get


def extract(wheel: pathlib.Path, files, dest: pathlib.Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [f for f in files if f not in names]
        assert not missing, f"{wheel.name} does not ship {missing}"
        for f in files:
            zf.extract(f, dest)


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
    proc = subprocess.run(["patch", "-p1", "--fuzz=0", "-i", str(diff)] if "patch" in tools
                          else ["git", "apply", str(diff)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in files:
        py_compile.compile(str(tmp_path / f), doraise=True)
        assert "dsv" in (tmp_path / f).read_text()
