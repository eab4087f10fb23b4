"""The codeio sandbox (fst/tasks/sandbox.py) against hostile snippets, with the real bubblewrap.

Each attack runs twice: with the in-interpreter audit hook (the refusal comes from the hook)
and with `audit_hook=False`, which shows the kernel boundary refusing it on its own. Every
test asserts the specific refusal and that nothing reached the host.
"""

from __future__ import annotations

import ast
import ctypes
import glob
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fst.tasks.sandbox import SandboxUnavailableError, run_sandboxed, seccomp_program

REPO = Path(__file__).resolve().parents[2]
HOOK = pytest.mark.parametrize("hook", [True, False], ids=["hook", "kernel"])
EPERM = "PermissionError: [Errno 1] Operation not permitted"


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The sandbox's host-side temp dirs go here; each test checks it ends up empty."""
    tmp = tmp_path / "sandbox-tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert list(tmp.iterdir()) == []


def refused(code: str, hook: bool, **kw) -> str:
    res = run_sandboxed(code, audit_hook=hook, **kw)
    assert not res.ok and res.error is not None, res
    return res.error


# ----------------------------------------------------------------------------- secrets


@HOOK
@pytest.mark.parametrize("target", ["f'/proc/{os.getppid()}/environ'", "'/proc/1/environ'"])
def test_parent_environment_unreadable(
    hook: bool, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"postgresql://fst:{uuid.uuid4().hex}@db/fst"
    monkeypatch.setenv("FST_TEST_DATABASE_URL", secret)
    res = run_sandboxed(f"import os\nprint(open({target}).read())", audit_hook=hook)
    assert not res.ok and secret not in res.stdout
    if hook:
        assert "blocked (other processes)" in (res.error or "")
    else:  # no /proc at all inside
        assert (res.error or "").startswith("FileNotFoundError: [Errno 2] No such file or direc")


@HOOK
def test_environment_is_fresh(hook: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code = "import os\nprint(sorted(os.environ.items()), os.getpid(), os.getppid(), os.getuid())"
    res = run_sandboxed(code, audit_hook=hook)
    assert res.ok, res
    assert secret not in res.stdout
    # Only what the sandbox sets; pid 2 under bwrap's init: the trainer's pid is not visible.
    assert res.stdout == (
        "[('LC_ALL', 'C.UTF-8'), ('PATH', '/usr/bin:/bin'), ('PWD', '/sandbox')] 2 1 65534\n"
    )


def test_filesystem_is_minimal() -> None:
    res = run_sandboxed("import os\nprint(sorted(os.listdir('/')))\nprint(os.listdir('/etc'))")
    assert res.ok, res
    top, etc = (ast.literal_eval(line) for line in res.stdout.splitlines())
    assert "sandbox" in top and not {"proc", "dev", "tmp", "home", "work", "bin"} & set(top)
    assert etc == ["ld.so.cache"]
    hidden = [sys.executable, str(REPO / "pyproject.toml"), "/bin/sh", "/usr/bin/env"]
    res = run_sandboxed(f"import os\nprint([os.path.exists(p) for p in {hidden!r}])")
    assert res.stdout == "[False, False, False, False]\n", res


# ----------------------------------------------------------------------------- writes


def _write_attempts(target: str) -> dict[str, str]:
    return {
        "mkdir": f"import os\nos.mkdir({target!r})",
        "open": f"open({target!r}, 'w').write('x')",
        "os.open": f"import os\nos.open({target!r}, os.O_CREAT | os.O_WRONLY)",
        "sqlite3": f"import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
    }


@HOOK
@pytest.mark.parametrize("where", ["tmp", "repo"])
@pytest.mark.parametrize("how", ["mkdir", "open", "os.open", "sqlite3"])
def test_no_writes_outside_sandbox(hook: bool, where: str, how: str) -> None:
    base = Path("/tmp") if where == "tmp" else REPO
    target = base / f"fst-escape-{uuid.uuid4().hex}"
    try:
        error = refused(_write_attempts(str(target))[how], hook)
        if hook:
            assert "blocked (outside sandbox)" in error
        elif how == "sqlite3":
            assert error == "sqlite3.OperationalError: unable to open database file"
        else:  # the host path does not exist inside
            assert f"[Errno 2] No such file or directory: '{target}'" in error
        assert not target.exists()
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()


@pytest.mark.parametrize("how", ["mkdir", "open", "sqlite3"])
def test_visible_files_are_read_only(how: str) -> None:
    stdlib = os.path.join(sysconfig.get_path("stdlib"), f"fst-escape-{uuid.uuid4().hex}")
    for target in (f"/fst-escape-{how}", stdlib):
        try:
            error = refused(_write_attempts(target)[how], hook=False)
            if how == "sqlite3":
                assert "unable to open database file" in error
            else:
                assert f"[Errno 30] Read-only file system: '{target}'" in error
            assert not os.path.exists(target)
        finally:  # should the sandbox ever let it through, do not leave it on the host
            if target == stdlib and os.path.isdir(target):
                os.rmdir(target)
            elif target == stdlib and os.path.exists(target):
                os.unlink(target)


def test_site_packages_are_hidden() -> None:
    site = os.path.join(sysconfig.get_path("stdlib"), "site-packages")
    if not os.listdir(site if os.path.isdir(site) else "/nonexistent-fst-dir"):
        pytest.skip(f"no (non-empty) {site} to hide")
    code = f"import os\nprint(os.listdir({site!r}))\nos.mkdir({site!r} + '/x')"
    res = run_sandboxed(code, audit_hook=False)
    assert res.stdout == "[]\n"
    assert f"[Errno 30] Read-only file system: '{site}/x'" in (res.error or "")


def test_scratch_files_stay_inside() -> None:
    res = run_sandboxed(
        "import sqlite3\nopen('a.txt', 'w').write('hi')\nc = sqlite3.connect('a.db')\n"
        "c.execute('create table t (x)')\nc.commit()\nprint(open('/sandbox/a.txt').read())"
    )
    assert res.ok and res.stdout == "hi\n", res
    res = run_sandboxed("import os\nprint(os.listdir('.'))")  # a fresh directory every time
    assert res.ok and res.stdout == "[]\n", res


# ----------------------------------------------------------------------------- native code

EVIL_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    printf("EVIL LOADED pid=%d\n", (int)fork());
    fflush(stdout);
}
"""


def _loader(path: str, hook: bool) -> str:
    if hook:  # ctypes is blocked by the hook, but the import machinery reaches dlopen too
        return (
            "import importlib.machinery as m, importlib.util as u\n"
            f"spec = u.spec_from_file_location('evil', {path!r}, "
            f"loader=m.ExtensionFileLoader('evil', {path!r}))\n"
            "u.module_from_spec(spec)\n"
        )
    return f"import ctypes\nctypes.CDLL({path!r})\n"


@pytest.fixture(scope="module")
def evil_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler; test_snippet_written_extension_cannot_load covers noexec")
    out = tmp_path_factory.mktemp("evil")
    (out / "evil.c").write_text(EVIL_C)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(out / "evil.so"), str(out / "evil.c")], check=True
    )
    # The control: outside the sandbox the constructor runs and forks.
    host = subprocess.run(
        [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(out / 'evil.so')!r})"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "EVIL LOADED pid=" in host.stdout
    return out / "evil.so"


@HOOK
def test_compiled_extension_cannot_load(hook: bool, evil_so: Path) -> None:
    # Written by the snippet into its (noexec) directory: mapping it executable fails.
    code = f"open('evil.so', 'wb').write({evil_so.read_bytes()!r})\n" + _loader(
        "/sandbox/evil.so", hook
    )
    res = run_sandboxed(code, audit_hook=hook)
    assert not res.ok and "EVIL" not in res.stdout
    assert "/sandbox/evil.so: failed to map segment from shared object" in (res.error or "")
    # Prepared on the host: not visible inside.
    res = run_sandboxed(_loader(str(evil_so), hook), audit_hook=hook)
    assert not res.ok and "EVIL" not in res.stdout
    assert f"{evil_so}: cannot open shared object file: No such file or directory" in (
        res.error or ""
    )


@HOOK
def test_no_exec_from_sandbox_dir(hook: bool) -> None:
    """A copy of the (runnable, read-only) interpreter in the writable directory cannot be
    executed, neither directly nor through the dynamic loader."""
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    args = "['py', '-c', 'print(7)']"
    res = run_sandboxed(f"import os\nos.execv({python!r}, {args})", audit_hook=hook)
    if hook:
        assert "os.exec blocked (process creation is disabled)" in (res.error or "")
    else:  # the control: the read-only interpreter can be exec'd (replacing the process)
        assert res.ok and res.stdout == "7\n", res
    copy = f"import os, shutil\nshutil.copyfile({python!r}, 'py')\n"
    error = refused(copy + f"os.chmod('py', 0o755)\nos.execv('/sandbox/py', {args})", hook)
    assert ("os.chmod blocked" if hook else "[Errno 13] Permission denied") in error
    loaders = glob.glob("/lib64/ld-linux-*.so.*") + glob.glob("/lib/ld-linux-*.so.*")
    if not hook and loaders:
        error = refused(copy + f"os.execv({loaders[0]!r}, ['ld', '/sandbox/py'])", hook)
        assert error.endswith("/sandbox/py: failed to map segment from shared object")


SIMPLE_EXTENSIONS = ("_json", "_bisect", "_queue", "_struct", "math")  # no imports of their own


@HOOK
def test_snippet_written_extension_cannot_load(hook: bool) -> None:
    """A copy of a genuine stdlib extension module loads from the read-only stdlib but not
    from the sandbox's writable directory (noexec), so the refusal is not about the file."""
    dynload = sysconfig.get_config_var("DESTSHARED")
    exts = [p for m in SIMPLE_EXTENSIONS for p in glob.glob(os.path.join(dynload, f"{m}.*.so"))]
    if not exts:
        pytest.skip(f"none of {SIMPLE_EXTENSIONS} is an extension module in {dynload}")
    ext = exts[0]
    name = os.path.basename(ext).split(".")[0]
    load = (
        "import importlib.machinery as m, importlib.util as u\n"
        "def load(path):\n"
        f"    loader = m.ExtensionFileLoader({name!r}, path)\n"
        f"    return u.module_from_spec(u.spec_from_file_location({name!r}, path, loader=loader))\n"
    )
    res = run_sandboxed(load + f"print(load({ext!r}).__name__)", audit_hook=hook)
    assert res.ok and res.stdout == f"{name}\n", res
    code = load + f"open('copy.so', 'wb').write(open({ext!r}, 'rb').read())\nload('copy.so')"
    error = refused(code, hook)
    assert "copy.so: failed to map segment from shared object" in error


@HOOK
@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.memfd_create('x')",
        "import mmap\nmmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
    ],
    ids=["memfd_create", "anonymous-exec-memory"],
)
def test_no_code_from_memory(hook: bool, code: str) -> None:
    # seccomp; and there is no /proc/self/fd to dlopen a memfd through anyway.
    assert refused(code, hook) == EPERM


def test_plain_anonymous_memory_and_threads_work() -> None:
    res = run_sandboxed(
        "import mmap, threading\nm = mmap.mmap(-1, 4096)\nm[:2] = b'ok'\n"
        "t = threading.Thread(target=lambda: print(bytes(m[:2]).decode()))\nt.start()\nt.join()"
    )
    assert res.ok and res.stdout == "ok\n", res


# ----------------------------------------------------------------------------- processes


@HOOK
@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.fork()",
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'])",
        "import os, sys\nos.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {})",
    ],
    ids=["fork", "subprocess", "posix_spawn"],
)
def test_no_process_creation(hook: bool, code: str) -> None:
    error = refused(code, hook)
    if hook:
        assert "blocked (process creation is disabled)" in error
    else:
        assert error.startswith(EPERM)


@HOOK
def test_os_system_cannot_start_a_shell(hook: bool) -> None:
    res = run_sandboxed("import os\nprint(os.system('echo pwned'))", audit_hook=hook)
    assert "pwned" not in res.stdout
    if hook:
        assert "os.system blocked (process creation is disabled)" in (res.error or "")
    else:  # posix_spawn of /bin/sh fails (EPERM; and there is no shell): exit status 127
        assert res.ok and res.stdout == f"{127 << 8}\n"


# ----------------------------------------------------------------------------- network


@HOOK
def test_no_network(hook: bool) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        error = refused(code, hook)
        if hook:
            assert "blocked (network access is disabled)" in error
        else:
            assert error == EPERM
        with pytest.raises(BlockingIOError):
            listener.accept()


# ----------------------------------------------------------------------------- limits


def test_timeout_kills_the_whole_sandbox() -> None:
    # In a child that is a subreaper (PR_SET_CHILD_SUBREAPER): anything the sandbox left
    # behind (a process, or a zombie init of its pid namespace) would be reparented to it.
    code = (
        "import ctypes, os, time\n"
        "from fst.tasks.sandbox import run_sandboxed\n"
        "assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0\n"
        "res = run_sandboxed('while True:\\n    pass\\n', timeout_s=0.5)\n"
        "time.sleep(0.3)\n"
        "left = []\n"
        "while True:\n"
        "    try:\n"
        "        pid, _ = os.waitpid(-1, os.WNOHANG)\n"
        "    except ChildProcessError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        left.append('running')\n"
        "        break\n"
        "    left.append(pid)\n"
        "print(res.error, left)\n"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TMPDIR": tempfile.gettempdir()},
    ).stdout
    assert out == "timeout: killed after 0.5s []\n"
    assert time.monotonic() - start < 10.0


# ----------------------------------------------------------------------------- fail closed


def test_fails_closed_without_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(SandboxUnavailableError, match=r"bubblewrap \('bwrap'\) not found") as e:
        run_sandboxed("print(1)", path=str(empty))
    assert "apt-get install bubblewrap" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("PATH", str(empty))  # the same through the environment
    with pytest.raises(SandboxUnavailableError, match="not found"):
        run_sandboxed("print(1)")


def test_fails_closed_without_user_namespaces() -> None:
    # A real host without user namespaces: this test's own child under bwrap --disable-userns.
    code = (
        "from fst.tasks.sandbox import SandboxUnavailableError, run_sandboxed\n"
        "try:\n    run_sandboxed('print(1)')\n"
        "except SandboxUnavailableError as e:\n    print('REFUSED', e)\n"
    )
    out = _in_outer_sandbox(["--disable-userns"], code)
    assert out.startswith("REFUSED sandbox: cannot create namespaces (unshare: "), out
    assert "allow unprivileged user namespaces" in out and "FST_SANDBOX=process" in out


def _in_outer_sandbox(outer: list[str], code: str) -> str:
    """Run `code` (which uses fst.tasks.sandbox) in a child under `bwrap *outer`: a host made
    different in one respect, for real."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    base = [bwrap, "--dev-bind", "/", "/", "--unshare-user", "--uid", str(os.getuid())]
    return subprocess.run(
        [*base, *outer, "--die-with-parent", sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TMPDIR": tempfile.gettempdir()},
    ).stdout


def test_works_in_a_container_like_host() -> None:
    # Containers mount /proc/sys read-only (bwrap's --disable-userns would fail there).
    code = "from fst.tasks.sandbox import run_sandboxed\nprint(run_sandboxed('print(6 * 7)'))"
    out = _in_outer_sandbox(["--ro-bind", "/proc/sys", "/proc/sys"], code)
    assert out == "SandboxResult(ok=True, stdout='42\\n', error=None)\n"


def test_unknown_mode_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FST_SANDBOX", "none")
    with pytest.raises(SandboxUnavailableError, match="unknown mode 'none'"):
        run_sandboxed("print(1)")


def test_seccomp_program_shape() -> None:
    prog = seccomp_program("x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 256  # bwrap / the kernel's BPF limits
    assert seccomp_program("aarch64") != prog
    with pytest.raises(SandboxUnavailableError, match="no seccomp filter for architecture"):
        seccomp_program("riscv64")


# ----------------------------------------------------------------------------- process mode


# Loads fst/tasks/sandbox.py (standard library only) from stdin, so any Python can run it.
PROCESS_MODE_CHILD = """
import os, subprocess, sys, types
mod = types.ModuleType("fst_sandbox")
sys.modules["fst_sandbox"] = mod
exec(compile(sys.stdin.read(), "sandbox.py", "exec"), mod.__dict__)
read = "import os\\nprint(open(f'/proc/{os.getppid()}/environ').read())"
secret = os.environ["FST_TEST_SECRET"]
control = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, env={})
print("CONTROL", secret in control.stdout)
res = mod.run_sandboxed(read, mode="process", audit_hook=False)
print("SANDBOX", res.ok, secret in res.stdout, res.error)
"""


SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _unprivileged_python() -> str | None:
    """A Python that uid 65534 can run (the project's venv may live in root's home)."""
    if shutil.which("setpriv") is None:
        return None
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python):
            probe = [*SETPRIV, python, "-c", ""]
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return python
    return None


def test_process_mode_hides_the_parent_environment() -> None:
    """The weaker mode as a restricted pod runs it (not root, no user namespaces). Control: a
    plain child of the same uid reads the parent's secrets (the attack that worked before);
    the process sandbox makes the parent non-dumpable first, so the same read is refused."""
    root = os.geteuid() == 0
    python = _unprivileged_python() if root else sys.executable
    if python is None:
        pytest.skip("no Python that uid 65534 can run")
    tmp = tempfile.mkdtemp(dir="/tmp", prefix="fst-test-")
    os.chmod(tmp, 0o777)
    try:
        out = subprocess.run(
            [*(SETPRIV if root else []), python, "-c", PROCESS_MODE_CHILD],
            input=(REPO / "fst/tasks/sandbox.py").read_text(),
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.defpath, "TMPDIR": tmp, "FST_TEST_SECRET": uuid.uuid4().hex},
        ).stdout
    finally:
        shutil.rmtree(tmp)
    control, sandboxed = out.splitlines()
    assert control == "CONTROL True"
    assert sandboxed.startswith(
        "SANDBOX False False PermissionError: [Errno 13] Permission denied: '/proc/"
    )


def test_process_mode_never_runs_code_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FST_SANDBOX", "process")
    try:
        res = run_sandboxed("import os\nprint(os.getuid())")
    except SandboxUnavailableError as e:  # root, and uid 65534 cannot run this interpreter
        assert os.geteuid() == 0 and "runs the code as uid 65534" in str(e)
        return
    assert res.ok and res.stdout == f"{65534 if os.geteuid() == 0 else os.geteuid()}\n"
    libc = ctypes.CDLL(None)
    assert libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE: the parent is not dumpable
    assert "blocked (process creation" in refused("import os\nos.fork()", hook=True)
