"""Packaging: the wheel builds from the Docker build context; each image's install (the sources
its Dockerfile copies, the wheel built from them, the base dependencies plus that program's
extra) runs its program and carries nothing of the other; the base install alone names the
missing extra instead of failing with a traceback; the Dockerfiles follow the rules the images
promise (checked by reading them: no container engine is needed here)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("runtime", "protos", "certs")
PACKAGES = ("agent", "server", *SHARED)
SCRIPTS = ("podiam-server", "podiam-agent", "podiam-certs")
COMPONENTS = ("agent", "server")
# Libraries only the server uses: none may be importable where only the agent is installed.
SERVER_ONLY = ("boto3", "botocore", "kubernetes_asyncio", "grpc_health", "yaml")
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
}


def other(component: str) -> str:
    return "server" if component == "agent" else "agent"


# --- The build context, as Docker sends it ---------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns this repository uses: a path is excluded when it or one
    of its parent directories matches a pattern (``**/`` matches at any depth)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], pattern[3:]):
                return True
    return False


def copy_build_context(destination: Path, only: set[str] | None = None) -> Path:
    """The build context; with ``only``, just those top-level files and directories of it (what
    a Dockerfile's COPY lines take)."""
    patterns = dockerignore_patterns()
    for directory, subdirs, files in os.walk(ROOT):
        base = Path(directory).relative_to(ROOT)
        subdirs[:] = [d for d in subdirs if not ignored((base / d).as_posix(), patterns)]
        for name in files:
            relative = (base / name).as_posix()
            if only is not None and relative.split("/")[0] not in only:
                continue
            if not ignored(relative, patterns):
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, target)
    return destination


def build_wheel(context: Path, out: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(context)])
    (built,) = out.glob("podiam-*.whl")
    return built


def install(root: Path, requirement: str) -> Path:
    """A fresh virtualenv at ``root`` with ``requirement`` and its dependencies."""
    run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-compile",
         requirement])  # fmt: skip
    return root


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return result


def clean_env() -> dict[str, str]:
    """Run outside the source tree's settings: no PYTHONPATH, no PODIAM_ flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PODIAM_"))}
    env.pop("HOST_IP", None)
    return env


# --- The wheel a developer builds (`pip install .`) ------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built once from a copy of the whole build context (never writing into the source tree)."""
    context = copy_build_context(tmp_path_factory.mktemp("context"))
    return build_wheel(context, tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def base_venv(wheel, tmp_path_factory) -> Path:
    """The wheel with its base dependencies only (`pip install podiam`, no extra)."""
    return install(tmp_path_factory.mktemp("base-venv"), str(wheel))


def test_wheel_holds_every_package_and_the_proto(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source_packages = {
        init.parent.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = sorted(p for p in source_packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel: {missing}"
    assert "protos/kiam.proto" in names
    # Developer tools stay out: the tests, the benchmarks, the demo.
    assert not any(name.startswith(("tests/", "bench/", "demo/")) for name in names)


def test_wheel_declares_the_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(entry_points).decode()
    for script in SCRIPTS:
        assert re.search(rf"^{script} = \w+\.__main__:main$", text, re.M), text


@pytest.mark.parametrize("component", COMPONENTS)
def test_program_without_its_extra_names_the_extra_in_one_line(base_venv, component, tmp_path):
    script = f"podiam-{component}"
    argv = [str(base_venv / "bin" / script), "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{script}: error: needs the [{component}] extra")
    assert f"pip install 'podiam[{component}]'" in line


def test_certs_tool_runs_on_the_base_install(base_venv, tmp_path):
    result = run([str(base_venv / "bin" / "podiam-certs"), "--help"], cwd=tmp_path, env=clean_env())
    assert "usage: podiam-certs" in result.stdout


# --- Each image's install, as its Dockerfile makes it ----------------------------------------


@pytest.fixture(scope="module", params=COMPONENTS)
def image_venv(request, tmp_path_factory) -> tuple[str, Path]:
    """What ``Dockerfile.<component>``'s build stage does, read from it: copy its sources, build
    the wheel from them, install it with the extra it names, remove the launchers it removes."""
    component = request.param
    build = parse_dockerfile(ROOT / f"Dockerfile.{component}").stages[0]
    context = copy_build_context(tmp_path_factory.mktemp(f"{component}-context"), copied(build))
    built = build_wheel(context, tmp_path_factory.mktemp(f"{component}-wheels"))
    (extra,) = re.findall(r"podiam-\*\.whl\)?\[([\w,]+)\]", build.runs())
    root = install(tmp_path_factory.mktemp(f"{component}-venv"), f"{built}[{extra}]")
    for launcher in re.findall(r"\brm (?:-f )?/opt/podiam/bin/([\w-]+)", build.runs()):
        (root / "bin" / launcher).unlink()
    return component, root


def test_image_install_runs_its_program_and_the_certs_tool(image_venv, tmp_path):
    """What each image's smoke test does: the entry point imports everything it needs, from the
    installed wheel alone (run outside the source tree, without PYTHONPATH)."""
    component, root = image_venv
    for script in (f"podiam-{component}", "podiam-certs"):
        result = run([str(root / "bin" / script), "--help"], cwd=tmp_path, env=clean_env())
        assert f"usage: {script}" in result.stdout
    assert not (root / "bin" / f"podiam-{other(component)}").exists()


def test_image_install_holds_neither_the_other_program_nor_its_libraries(image_venv, tmp_path):
    component, root = image_venv
    absent = [other(component), *(SERVER_ONLY if component == "agent" else ())]
    present = [component, *SHARED]
    code = (
        "import importlib.util, sys\n"
        "for name in sys.argv[1:]: print(name, importlib.util.find_spec(name) is not None)"
    )
    result = run([str(root / "bin" / "python"), "-c", code, *absent, *present], cwd=tmp_path,
                 env={})  # fmt: skip
    found = dict(line.split() for line in result.stdout.splitlines())
    assert [name for name in absent if found[name] == "True"] == []
    assert [name for name in present if found[name] == "False"] == []


def test_installed_packages_come_from_the_virtualenv(image_venv, tmp_path):
    component, root = image_venv
    code = f"import {component}, runtime, certs, protos; print({component}.__file__)"
    result = run([str(root / "bin" / "python"), "-c", code], cwd=tmp_path, env={})
    assert result.stdout.startswith(str(root))


# --- The Dockerfiles -------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def runs(self) -> str:
        return "\n".join(self.all("RUN"))


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args[m[1] or m[2]], text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped (parser directives too)."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        instruction, _, rest = text.strip().partition(" ")
        instruction, rest = instruction.upper(), " ".join(rest.split())
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert instruction == "ARG", f"{path.name}: {instruction} before FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return Dockerfile(args=args, stages=stages)


@pytest.fixture(scope="module", params=["server", "agent"])
def image(request) -> tuple[str, Dockerfile]:
    return request.param, parse_dockerfile(ROOT / f"Dockerfile.{request.param}")


def test_multi_stage_build_on_a_slim_python_base(image):
    _, dockerfile = image
    assert len(dockerfile.stages) >= 2
    bases = {dockerfile.resolve(stage.base) for stage in dockerfile.stages}
    # One base for both stages: the virtualenv's interpreter links must hold in the image.
    assert len(bases) == 1
    (base,) = bases
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base


def test_wheel_is_built_once_and_installed_into_a_virtualenv(image):
    name, dockerfile = image
    build, final = dockerfile.stages[0], dockerfile.final
    assert build.name
    assert build.runs().count("pip wheel") == 1
    # The wheel, not the source tree, is installed; only binary wheels (no compiler needed).
    installs = re.findall(r"pip [^&]*install ([^&]*)", build.runs())
    assert installs and all("/wheels/" in args and "--only-binary" in args for args in installs)
    # With the program's own extra and no other.
    assert re.findall(r"\.whl\)?\[([\w,]+)\]", " ".join(installs)) == [name]
    assert f"--from={build.name} /opt/podiam /opt/podiam" in final.all("COPY")
    assert "pip" not in final.runs()  # nothing built or cached in the image itself
    assert any("PATH=/opt/podiam/bin:$PATH" in env for env in final.all("ENV"))


def copied(stage: Stage) -> set[str]:
    """The sources a stage's COPY lines take from the build context."""
    return {
        source.rstrip("/")
        for args in stage.all("COPY")
        if "--from=" not in args
        for source in args.split()[:-1]
        if not source.startswith("--")
    }


def test_image_copies_its_program_and_the_shared_packages_only(image):
    name, dockerfile = image
    patterns = dockerignore_patterns()
    sources = copied(dockerfile.stages[0])
    assert {name, *SHARED} <= sources
    assert other(name) not in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"


def test_no_compilers_or_package_caches_in_the_image(image):
    _, dockerfile = image
    runs = dockerfile.final.runs()
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make|python3-dev)\b", runs)
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs
        assert "rm -rf /var/lib/apt/lists/*" in runs


def test_oci_labels(image):
    _, dockerfile = image
    labels = " ".join(dockerfile.final.all("LABEL"))
    keys = set(re.findall(r"(org\.opencontainers\.image\.\w+)=", labels))
    assert keys >= OCI_LABELS


def test_entry_point_is_the_console_script_and_is_smoke_tested(image):
    name, dockerfile = image
    script = f"podiam-{name}"
    (entrypoint,) = dockerfile.final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == [script]
    assert f"{script} --help" in dockerfile.final.runs()


def test_server_image_runs_as_a_non_root_user(image):
    name, dockerfile = image
    user = dockerfile.final.all("USER")[-1]
    assert user.split(":")[0] not in {"0", "root"}
    if name == "server":
        assert "apt-get" not in dockerfile.final.runs()


def test_agent_image_has_iptables_and_conntrack():
    dockerfile = parse_dockerfile(ROOT / "Dockerfile.agent")
    runs = dockerfile.final.runs()
    for tool in ("iptables", "conntrack"):
        assert re.search(rf"apt-get install [^&]*\b{tool}\b", runs)
        assert f"command -v {tool}" in runs
    # The uninstall step (README) runs from this image.
    assert "podiam-agent cleanup --help" in runs


def test_exposed_ports_are_the_charts_defaults(image):
    name, dockerfile = image
    values = yaml.safe_load((ROOT / "charts/podiam/values.yaml").read_text())
    component = values[name]
    expected = {component["port"], component["metrics"]["port"]}
    (exposed,) = dockerfile.final.all("EXPOSE")
    assert {int(port) for port in exposed.split()} == expected
