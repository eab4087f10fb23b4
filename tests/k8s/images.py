"""Small OCI images for the real test node (tests/k8s/node.py), made here without a registry.

No registry is reachable from this machine, so every image a real node runs is made here and
imported into its containerd:

- `registry.k8s.io/pause:3.10`, the pod sandbox: a static C program that waits for signals
  and reaps children (what the real pause does), as containerd's `sandbox_image`;
- `fst.test/tools:<hash>`: Debian's static busybox (id, sh, cat, ...) and `memhog`, a static
  C program that allocates and touches N MiB (the OOM test).

Each is an OCI image layout made with `umoci` (Debian package) from files built with
`gcc -static`, packed as an OCI archive and cached as
$FST_CACHE/node-images/<name>-<hash of its inputs>.tar, rebuilt only when its inputs change.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.k8s.binaries import BinaryUnavailable, cache_root

HERE = Path(__file__).resolve().parent
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, no libc needed
# The busybox applets the tools image links, as /bin/<name>.
TOOLS_APPLETS = (
    "sh",
    "id",
    "cat",
    "echo",
    "ls",
    "sleep",
    "touch",
    "test",
    "true",
    "false",
    "grep",
    "nc",
)


@dataclass(frozen=True)
class ImageArchive:
    """An image as an archive `ctr images import` reads (OCI or docker-archive), and the name
    it gets in containerd."""

    name: str
    path: Path


def pause_image() -> ImageArchive:
    source = HERE / "pause.c"
    return _cached("pause", PAUSE_IMAGE, [source], _build_pause)


def tools_image() -> ImageArchive:
    inputs = [HERE / "memhog.c", BUSYBOX, Path(__file__)]
    digest = _inputs_hash(inputs)[:12]
    return _cached("tools", f"fst.test/tools:{digest}", inputs, _build_tools)


def _build_pause(rootfs: Path, work: Path) -> list[str]:
    _gcc_static(HERE / "pause.c", rootfs / "pause")
    # 65535: the pause image's own non-root user.
    return ["--config.entrypoint", "/pause", "--config.user", "65535:65535"]


def _build_tools(rootfs: Path, work: Path) -> list[str]:
    if not BUSYBOX.is_file():
        raise BinaryUnavailable(
            f"{BUSYBOX} is missing: install Debian's busybox-static (make test-deps does)"
        )
    (rootfs / "bin").mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in TOOLS_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    _gcc_static(HERE / "memhog.c", rootfs / "bin" / "memhog")
    return ["--config.env", "PATH=/bin", "--config.cmd", "/bin/sh"]


# ----------------------------------------------------------------------------- plumbing


def _cached(stem: str, name: str, inputs: list[Path], build) -> ImageArchive:
    digest = _inputs_hash([*inputs, Path(__file__)])[:16]
    folder = cache_root() / "node-images"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}-{digest}.tar"
    with (folder / f".{stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            for old in folder.glob(f"{stem}-*.tar"):
                old.unlink()  # an image of older inputs
            _umoci_image(name, target, build)
    return ImageArchive(name, target)


def _umoci_image(name: str, target: Path, build) -> None:
    """An OCI archive at `target`: one layer holding what `build(rootfs, work)` put into the
    root folder, with the config options it returns."""
    umoci = shutil.which("umoci")
    if umoci is None:
        raise BinaryUnavailable("umoci is missing: install Debian's umoci (make test-deps does)")
    tag = name.rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory(prefix="fst-image-") as tmp:
        work = Path(tmp)
        layout, bundle = work / "layout", work / "bundle"
        image = f"{layout}:{tag}"
        _run([umoci, "init", "--layout", str(layout)])
        _run([umoci, "new", "--image", image])
        _run([umoci, "unpack", "--image", image, str(bundle)])
        config = build(bundle / "rootfs", work)
        _run([umoci, "repack", "--image", image, str(bundle)])
        _run([umoci, "config", "--image", image, *config])
        _run([umoci, "gc", "--layout", str(layout)])
        partial = target.with_suffix(".partial")
        _run(["tar", "-C", str(layout), "-cf", str(partial), "."])
        partial.rename(target)


def _gcc_static(source: Path, output: Path) -> None:
    if shutil.which("gcc") is None:
        raise BinaryUnavailable("gcc is missing: install Debian's gcc (make test-deps does)")
    _run(["gcc", "-static", "-O2", "-o", str(output), str(source)])


def _inputs_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BinaryUnavailable(
            f"`{' '.join(cmd[:3])} ...` failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
