"""The binaries of the test Kubernetes control plane, built from Go modules and cached.

Nothing here ships in the `fst` package: it is test support, like tests/servers.py for MinIO.

Each group of binaries is built once, from the Go module proxy only, into a cache outside the
repo: $FST_CACHE/k8s/<group>-<version>/ (FST_CACHE defaults to ~/.cache/fastslow), e.g.
~/.cache/fastslow/k8s/kubernetes-v1.34.12/kube-apiserver. A build writes a throwaway wrapper
Go module into a temp folder, builds into a temp folder next to the target, and renames it
into place under a file lock: concurrent test runs wait for each other and a killed build never
leaves half a folder behind. `build-seconds.txt` in each folder records how long it took.

Prebuilt binaries (e.g. from setup-envtest, a release tarball or a distro) are used instead
when these variables name them: FST_ETCD_BIN, FST_KUBE_APISERVER_BIN,
FST_KUBE_CONTROLLER_MANAGER_BIN, FST_KUBE_SCHEDULER_BIN, FST_KWOK_BIN, FST_HELM_BIN,
FST_KUEUE_BIN.

    python -m tests.k8s.binaries      # build whatever is missing, print the paths

Kueue's controller (kueue-<version>/kueue) is built with them, and its CRDs are copied from
its module into kueue-<version>/crds/; FST_KUEUE_BIN and FST_KUEUE_CRDS name prebuilt ones.

Go builds run under `nice -n 19` (and `ionice -c3` where present): a test run should not
starve whatever else the machine does. FST_GO_BUILD_JOBS sets `go build -p` (default: cores).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# One Kubernetes release; its staging modules (k8s.io/api, ...) are the matching v0.X.Y.
# Not the newest 1.34 patch: the checksum database reached from here lacks some staging
# modules of v1.34.5 to v1.34.12, and `go` refuses modules it cannot verify.
KUBERNETES_VERSION = "v1.34.4"
# etcd >= 3.5.21 is what Kubernetes 1.34 supports; 3.6 is the line it ships with.
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"  # Helm 3 built against client-go 0.34, like the cluster
# Kueue (job queueing, quota, gang admission); its 0.17 line is built against client-go 0.35
# but talks to a 1.34 apiserver like any client. Not part of the control plane that every
# cluster test starts: tests/k8s/kueue.py starts it for the tests that ask for it.
KUEUE_VERSION = "v0.17.0"
KUEUE_CRDS = "config/components/crd/bases"  # in Kueue's module: its CRDs, as its release ships

KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


class BinaryUnavailable(RuntimeError):
    """A binary is missing and cannot be built; the message says how to get it."""


@dataclass(frozen=True)
class GoBuild:
    """A group of binaries built together from one wrapper module."""

    group: str
    version: str
    module: str  # the module to require at `version`
    binaries: dict[str, str]  # binary name -> Go package path of its main
    ldflags: list[str] = field(default_factory=list)
    # Folders of the module copied next to the binaries: {"crds": "config/crd/bases"}. From
    # the module cache of the same `go get`, so they always match the binary's version.
    files: dict[str, str] = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("FST_CACHE") or Path.home() / ".cache" / "fastslow")


def k8s_cache() -> Path:
    return cache_root() / "k8s"


def env_var(binary: str) -> str:
    """FST_KUBE_APISERVER_BIN for kube-apiserver, and so on."""
    return "FST_" + binary.upper().replace("-", "_") + "_BIN"


def _kubernetes_version_ldflags() -> list[str]:
    """Without these the servers report v0.0.0-master, and /version lies."""
    minor = KUBERNETES_VERSION.lstrip("v").split(".")[1]
    return _version_ldflags(
        ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"),
        {
            "gitVersion": KUBERNETES_VERSION,
            "gitMajor": "1",
            "gitMinor": minor,
            "gitTreeState": "clean",
        },
    )


def builds() -> list[GoBuild]:
    return [
        GoBuild(
            "etcd",
            ETCD_VERSION,
            "go.etcd.io/etcd/server/v3",
            # The server module's root package is etcd's main (it calls etcdmain.Main).
            {"etcd": "go.etcd.io/etcd/server/v3"},
        ),
        GoBuild(
            "kubernetes",
            KUBERNETES_VERSION,
            "k8s.io/kubernetes",
            {name: f"k8s.io/kubernetes/cmd/{name}" for name in KUBERNETES_COMMANDS},
            _kubernetes_version_ldflags(),
        ),
        GoBuild(
            "kwok",
            KWOK_VERSION,
            "sigs.k8s.io/kwok",
            {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
            _version_ldflags(("sigs.k8s.io/kwok/pkg/consts",), {"Version": KWOK_VERSION}),
        ),
        GoBuild(
            "helm",
            HELM_VERSION,
            "helm.sh/helm/v3",
            {"helm": "helm.sh/helm/v3/cmd/helm"},
            _version_ldflags(("helm.sh/helm/v3/internal/version",), {"version": HELM_VERSION}),
        ),
    ]


def kueue_build() -> GoBuild:
    """Kueue's controller manager and its CRDs: built by `python -m tests.k8s.binaries` (so
    `make test` has it), but not by `all_binaries()`, which a cluster start calls."""
    return GoBuild(
        "kueue",
        KUEUE_VERSION,
        "sigs.k8s.io/kueue",
        {"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
        _version_ldflags(("sigs.k8s.io/kueue/pkg/version",), {"GitVersion": KUEUE_VERSION}),
        files={"crds": KUEUE_CRDS},
    )


def kubelet_build() -> GoBuild:
    """The real node's kubelet (tests/k8s/node.py), from the control plane's Kubernetes
    module and version: a group of its own, built by `python -m tests.k8s.binaries` but not by
    `all_binaries()`, so that the control plane's cached build stays valid without it."""
    return GoBuild(
        "kubelet",
        KUBERNETES_VERSION,
        "k8s.io/kubernetes",
        {"kubelet": "k8s.io/kubernetes/cmd/kubelet"},
        _kubernetes_version_ldflags(),
    )


def all_builds() -> list[GoBuild]:
    return [*builds(), kubelet_build(), kueue_build()]


def _version_ldflags(packages: tuple[str, ...], values: dict[str, str]) -> list[str]:
    return [f"-X {pkg}.{name}={value}" for pkg in packages for name, value in values.items()]


def build_for(binary: str) -> GoBuild:
    for b in all_builds():
        if binary in b.binaries:
            return b
    raise KeyError(binary)


def binary(name: str, build: bool = True) -> Path:
    """The path of `name` (etcd, kube-apiserver, ..., kwok, helm): $FST_<NAME>_BIN if set,
    else the cached build, built now if missing (unless build=False)."""
    if env := os.environ.get(env_var(name)):
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BinaryUnavailable(f"{env_var(name)}={env} is not an executable file")
        return path
    spec = build_for(name)
    target = group_dir(spec) / name
    if target.is_file():
        return target
    if not build:
        raise BinaryUnavailable(f"{target} is missing (build it: python -m tests.k8s.binaries)")
    return build_group(spec) / name


def all_binaries(build: bool = True) -> dict[str, Path]:
    names = [name for b in builds() for name in b.binaries]
    return {name: binary(name, build) for name in names}


def group_dir(spec: GoBuild) -> Path:
    return k8s_cache() / f"{spec.group}-{spec.version}"


def kueue_crds(build: bool = True) -> Path:
    """The folder of Kueue's CRDs (one YAML file per CRD), cached next to its binary; with
    $FST_KUEUE_BIN set, $FST_KUEUE_CRDS names it."""
    if env := os.environ.get("FST_KUEUE_CRDS"):
        return Path(env)
    folder = binary("kueue", build).parent / "crds"
    if not any(folder.glob("*.yaml")):
        raise BinaryUnavailable(
            f"{folder} holds no CRDs: set FST_KUEUE_CRDS to the folder of Kueue "
            f"{KUEUE_VERSION}'s CRDs ({KUEUE_CRDS} in its source)"
        )
    return folder


def build_seconds(spec: GoBuild) -> float | None:
    try:
        return float((group_dir(spec) / "build-seconds.txt").read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- building


def go_binary() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BinaryUnavailable(
            "Go is needed to build the test Kubernetes control plane (etcd, kube-apiserver, "
            "kwok, helm) and is not installed. Install Go >= 1.26 (https://go.dev/dl), or set "
            "FST_ETCD_BIN, FST_KUBE_APISERVER_BIN, FST_KUBE_CONTROLLER_MANAGER_BIN, "
            "FST_KUBE_SCHEDULER_BIN, FST_KWOK_BIN and FST_HELM_BIN to prebuilt binaries."
        )
    return found


def build_group(spec: GoBuild) -> Path:
    """Build every binary of `spec` into its cache folder, unless another process did."""
    final = group_dir(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / f".{spec.group}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((final / name).is_file() for name in spec.binaries):
            return final  # built by someone else while we waited
        out = Path(tempfile.mkdtemp(prefix=f".build-{spec.group}-", dir=final.parent))
        work = Path(tempfile.mkdtemp(prefix=f"fst-gobuild-{spec.group}-"))
        try:
            t0 = time.monotonic()
            _go_build(spec, work, out)
            (out / "build-seconds.txt").write_text(f"{time.monotonic() - t0:.0f}\n")
            shutil.rmtree(final, ignore_errors=True)  # a partial folder from older code
            out.rename(final)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return final


def _go_build(spec: GoBuild, work: Path, out: Path) -> None:
    go = go_binary()
    lines = [f"module fstbuild/{spec.group}", "", "go 1.26", ""]
    if spec.module == "k8s.io/kubernetes":
        lines += kubernetes_replaces(go, spec.version, work)
    (work / "go.mod").write_text("\n".join(lines) + "\n")
    packages = list(spec.binaries.values())
    # `go get` of the main packages adds the module and the go.sum lines their imports need.
    _run([go, "get", *(f"{p}@{spec.version}" for p in packages)], work, spec)
    ldflags = " ".join(["-s", "-w", *spec.ldflags])
    jobs = os.environ.get("FST_GO_BUILD_JOBS") or str(os.cpu_count() or 1)
    # `go build -o DIR/` of several mains shares the compiled packages between them.
    cmd = [go, "build", f"-p={jobs}", "-trimpath", "-ldflags", ldflags, "-o", f"{out}/"]
    _run([*cmd, *packages], work, spec)
    for name, package in spec.binaries.items():
        built = out / _default_binary_name(package)
        if name != built.name:
            built.rename(out / name)
        if not (out / name).is_file():
            raise BinaryUnavailable(f"`go build {package}` produced no {name} in {out}")
    if spec.files:
        # The module `go get` just fetched, from the module cache (no second download).
        module = f"{spec.module}@{spec.version}"
        info = json.loads(_run([go, "mod", "download", "-json", module], work, spec))
        for folder, source in spec.files.items():
            shutil.copytree(Path(info["Dir"]) / source, out / folder)
            # The module cache's files and folders are read-only: writable copies, so that
            # a rebuild (or rm -r) can replace them.
            for path in [out / folder, *(out / folder).rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)


def _default_binary_name(package: str) -> str:
    """The file name `go build -o DIR/` gives a main: its last path element, skipping a
    major-version suffix (go.etcd.io/etcd/server/v3 -> server)."""
    parts = package.rstrip("/").split("/")
    if len(parts) > 1 and re.fullmatch(r"v\d+", parts[-1]):
        return parts[-2]
    return parts[-1]


def kubernetes_replaces(go: str, version: str, work: Path) -> list[str]:
    """k8s.io/kubernetes points its staging modules (k8s.io/api, ...) at folders of its own
    repo, which a dependent module cannot see: send each to its published v0.X.Y instead."""
    info = json.loads(_run([go, "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], work))
    if info.get("Error"):
        raise BinaryUnavailable(f"go mod download k8s.io/kubernetes@{version}: {info['Error']}")
    gomod = Path(info["GoMod"]).read_text()
    staging = set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", gomod, flags=re.M))
    # Only the staging modules it requires: a replace line for one outside the module graph
    # would be harmless, but some (k8s.io/sample-controller) are not published for every patch.
    required = set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+v0\.0\.0\s*$", gomod, flags=re.M))
    staging = sorted(staging & required)
    if not staging:
        raise BinaryUnavailable(f"no staging replace lines in k8s.io/kubernetes@{version} go.mod")
    published = "v0." + version.lstrip("v").split(".", 1)[1]
    return ["replace ("] + [f"\t{m} => {m} {published}" for m in staging] + [")"]


def _run(cmd: list[str], cwd: Path, spec: GoBuild | None = None) -> str:
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOWORK": "off"}
    proc = subprocess.run(
        [*_low_priority(), *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=7200
    )
    if proc.returncode != 0:
        what = f" ({spec.group} {spec.version})" if spec else ""
        raise BinaryUnavailable(
            f"`{' '.join(cmd[:3])} ...`{what} failed ({proc.returncode}); building the test "
            "Kubernetes binaries needs the Go module proxy (GOPROXY). Or set the FST_*_BIN "
            "variables to prebuilt binaries (see tests/k8s/binaries.py).\n"
            + (proc.stderr or proc.stdout)[-4000:]
        )
    return proc.stdout


def _low_priority() -> list[str]:
    prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
    if shutil.which("ionice"):
        prefix += ["ionice", "-c3"]
    return prefix


def main() -> int:
    for spec in all_builds():
        names = ", ".join(spec.binaries)
        print(f"{spec.group} {spec.version} ({names}) ...", flush=True)
        t0 = time.monotonic()
        for name in spec.binaries:
            path = binary(name)
        took = time.monotonic() - t0
        note = f"built in {took:.0f}s" if took > 5 else f"cached, built in {build_seconds(spec)}s"
        print(f"  {path.parent}: {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
