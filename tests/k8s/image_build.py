"""The project's images, built here without a Docker engine, for the real test node.

    archive = operator_image()        # operator/Dockerfile
    archive = trainer_cpu_image()     # trainer-image/Dockerfile.cpu
    node.import_image(archive)        # tests/k8s/node.py

Users build the same Dockerfiles with `docker build` on the public base images
(trainer-image/README.md). Here the build differs only in what is passed to it, never in a
second Dockerfile:

- **the builder** is buildah (Debian's package; daemonless, reads Dockerfiles, keeps a layer
  cache), running as root with the overlay storage driver;
- **the base** (`PYTHON_IMAGE`) is a Debian 12 root filesystem with Python 3.11 made by
  `mmdebstrap` from Debian's packages (no registry is reachable for `python:3.11-slim`),
  imported into buildah as `localhost/fst-debian-python:<hash>`;
- **torch** comes from PyPI (`TORCH_INDEX_URL=https://pypi.org/simple`): the PyTorch CPU index
  is not reachable from here, and PyPI's torch wheel carries its CUDA libraries (several GB);
- **the machine's TLS trust**: when the build's RUN steps reach PyPI through an intercepting
  proxy, its CA must be trusted. The host's CA bundle is mounted over the image's for the
  RUN steps only, with a pip.conf naming it (`--volume`, never committed to a layer).

Each image is cached as an image archive (docker-archive: uncompressed layers, which
containerd imports as it does an OCI archive), $FST_CACHE/node-images/<name>-<hash>.tar, where
the hash covers the Dockerfile, every file of the build context it can see (its
.dockerignore), the build arguments and RECIPE; `<name>-<hash>.json` records its build time
and size. buildah's own storage (the base image and the layer cache, so a source change
reinstalls the project but not torch) is $FST_CACHE/buildah; it only grows by the layers of
changed sources (remove the folder to reset it). Builds hold a file lock: concurrent test runs
wait.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.k8s.binaries import BinaryUnavailable, cache_root
from tests.k8s.images import ImageArchive

REPO = Path(__file__).resolve().parents[2]
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRRORS = (
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE} main",
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main",
)
# What python:3.11-slim gives the Dockerfiles: Python 3.11 with venv, and CA certificates.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT = 3600
# Part of every image's hash: bump it when a change here changes what a build produces (its
# options, the archive format); a change of the Dockerfile or its context rebuilds anyway.
RECIPE = "buildah-bud/docker-archive/1"


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str  # relative to the repository
    name: str  # the name the image gets in containerd (and in the chart / the run's spec)
    build_args: tuple[tuple[str, str], ...] = ()


def operator_image() -> ImageArchive:
    return build(ImageSpec("operator/Dockerfile", "ghcr.io/fastslow/operator:test"))


def trainer_cpu_image() -> ImageArchive:
    spec = ImageSpec(
        "trainer-image/Dockerfile.cpu",
        "ghcr.io/fastslow/trainer:test-cpu",
        (("TORCH_INDEX_URL", "https://pypi.org/simple"),),
    )
    return build(spec)


def build_record(archive: ImageArchive) -> dict:
    """{"seconds": build time, "bytes": archive size, ...} of a cached image."""
    result: dict = json.loads(archive.path.with_suffix(".json").read_text())
    return result


# ----------------------------------------------------------------------------- building


def build(spec: ImageSpec) -> ImageArchive:
    folder = cache_root() / "node-images"
    folder.mkdir(parents=True, exist_ok=True)
    stem = spec.name.rsplit("/", 1)[-1].replace(":", "-")
    with (folder / f".{stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = debian_python_base()
        digest = _spec_hash(spec, base)
        target = folder / f"{stem}-{digest}.tar"
        if not target.is_file():
            for old in folder.glob(f"{stem}-*"):
                old.unlink()  # an image of older inputs
            t0 = time.monotonic()
            _bud(spec, base, target)
            record = {
                "name": spec.name,
                "seconds": round(time.monotonic() - t0),
                "bytes": target.stat().st_size,
                "base": base,
            }
            target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return ImageArchive(spec.name, target)


def debian_python_base() -> str:
    """The buildah image standing in for python:3.11-slim, made once by mmdebstrap."""
    recipe = json.dumps([DEBIAN_MIRRORS, BASE_PACKAGES])
    name = f"localhost/fst-debian-python:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if _buildah("images", "--quiet", name, check=False).returncode == 0:
        return name
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise BinaryUnavailable("mmdebstrap is missing: install Debian's mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="fst-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        _run(
            [
                mmdebstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "--format=tar",
                DEBIAN_SUITE,
                str(rootfs),
                *DEBIAN_MIRRORS,
            ]
        )
        container = _buildah("from", "scratch").stdout.strip()
        try:
            _buildah("add", container, str(rootfs), "/")
            path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            _buildah("config", "--env", f"PATH={path}", "--cmd", "/bin/bash", container)
            _buildah("commit", "--quiet", container, name)
        finally:
            _buildah("rm", container, check=False)
    return name


def _bud(spec: ImageSpec, base: str, target: Path) -> None:
    dockerfile = REPO / spec.dockerfile
    with tempfile.TemporaryDirectory(prefix="fst-bud-") as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        pip_conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        args = [f"--build-arg=PYTHON_IMAGE={base}"]
        args += [f"--build-arg={key}={value}" for key, value in spec.build_args]
        # One tag per image, replaced by each build: its layers (and the intermediate images
        # of --layers) stay in buildah's storage as the cache of the next build, so a source
        # change reinstalls the project, not torch.
        local = f"localhost/fst-build/{target.stem.rsplit('-', 1)[0]}:latest"
        _buildah(
            "bud",
            "--layers",
            "--pull-never",
            "--network=host",
            f"--ignorefile={dockerfile}.dockerignore",
            f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
            f"--volume={pip_conf}:/etc/pip.conf:ro",
            f"--file={dockerfile}",
            *args,
            f"--tag={local}",
            str(REPO),
        )
        # A docker-archive keeps its layers uncompressed: gzip of several GB costs minutes
        # here, and containerd would only decompress them again on import.
        partial = target.with_suffix(".partial")
        _buildah("push", "--quiet", local, f"docker-archive:{partial}:{spec.name}")
        partial.rename(target)


def context_files(dockerfile: Path) -> list[Path]:
    """The build context's files that pass the Dockerfile's .dockerignore (an allow-list:
    `*` then `!path` lines, then exclusions like `**/__pycache__`)."""
    lines = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    denied = [p.removeprefix("**/") for p in patterns if not p.startswith("!") and p != "*"]
    files = []
    for entry in allowed:
        path = REPO / entry
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            parts = f.relative_to(REPO).parts
            if f.is_file() and not any(fnmatch.fnmatch(p, d) for p in parts for d in denied):
                files.append(f)
    return files


def _spec_hash(spec: ImageSpec, base: str) -> str:
    dockerfile = REPO / spec.dockerfile
    h = hashlib.sha256()
    h.update(json.dumps([RECIPE, spec.name, spec.build_args, base]).encode())
    for f in [dockerfile, *context_files(dockerfile)]:
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    buildah = shutil.which("buildah")
    if buildah is None:
        raise BinaryUnavailable("buildah is missing: install Debian's buildah")
    storage = cache_root() / "buildah"
    cmd = [
        buildah,
        f"--root={storage / 'storage'}",
        f"--runroot={storage / 'run'}",
        "--storage-driver=overlay",
        *args,
    ]
    return _run(cmd, check)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if check and proc.returncode != 0:
        raise BinaryUnavailable(
            f"`{' '.join(cmd[:4])} ...` failed ({proc.returncode}):\n"
            + (proc.stderr or proc.stdout)[-4000:]
        )
    return proc


def main() -> None:
    """`python -m tests.k8s.image_build`: build (or find in the cache) every image the real
    node's tests run, before the tests start (make test-deps), saying what each cost."""
    for build_image in (operator_image, trainer_cpu_image):
        t0 = time.monotonic()
        archive = build_image()
        record = build_record(archive)
        cached = time.monotonic() - t0 < record["seconds"] / 2
        print(
            f"{archive.name}: {record['bytes'] / 1e9:.2f} GB, "
            + (
                f"cached (built in {record['seconds']} s)"
                if cached
                else f"built in {record['seconds']} s"
            )
            + f" -> {archive.path}",
            flush=True,
        )


if __name__ == "__main__":
    main()
