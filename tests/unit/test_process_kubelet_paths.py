"""The process kubelet's mountPath rewriting (tests/k8s/process_kubelet.py)."""

from __future__ import annotations

from pathlib import Path

from tests.k8s.process_kubelet import rewrite_paths

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_each_mount_path_is_rewritten_once() -> None:
    # The folders live under /tmp, and /tmp is itself a mount: a folder put in for one mount
    # must not be rewritten again by the /tmp mount.
    mounts = {"/tmp": Path("/tmp/pod/volumes/tmp"), SA: Path("/tmp/pod/volumes/kube-api")}
    assert rewrite_paths(SA, mounts) == "/tmp/pod/volumes/kube-api"
    assert rewrite_paths(f"{SA}/token", mounts) == "/tmp/pod/volumes/kube-api/token"
    assert rewrite_paths("--out=/tmp/a.txt", mounts) == "--out=/tmp/pod/volumes/tmp/a.txt"


def test_only_whole_path_components_are_rewritten() -> None:
    mounts = {"/etc/fst": Path("/w/config")}
    assert rewrite_paths("/etc/fstx /etc/fst", mounts) == "/etc/fstx /w/config"
    assert rewrite_paths("x/etc/fst", mounts) == "x/etc/fst"
    assert rewrite_paths("a", {}) == "a"
