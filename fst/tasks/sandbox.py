"""Run untrusted Python (codeio's generated snippets) behind a kernel isolation boundary.

`run_sandboxed(code, timeout_s, memory_mb)` runs `code` in a fresh interpreter and returns a
`SandboxResult`. Two modes, chosen by the environment variable FST_SANDBOX (or `mode=`):

`bwrap` (the default) -- a real boundary, built from bubblewrap plus util-linux:

* `unshare --user --map-root-user --mount` + `mount` give a private mount namespace holding a
  16 MiB tmpfs mounted `noexec,nosuid,nodev`: the sandbox's only writable directory, seen
  inside as /sandbox (its working directory). bubblewrap cannot create a noexec mount itself
  (containers/bubblewrap#349) but keeps a bind source's noexec, so this one mount is done
  before it. The tmpfs disappears with the namespace: nothing is left on the host.
* `bwrap` then builds the sandbox: new user (uid/gid 65534 inside, no capabilities; seccomp
  stops further user namespaces), pid, network (no interfaces), ipc, uts (hostname
  "sandbox") and cgroup namespaces, `--die-with-parent`, `--new-session`, `--clearenv` (only
  PATH and LC_ALL are set; bubblewrap itself is started with nothing but PATH, so its pid-1
  reaper holds no secret either). The root is a read-only tmpfs holding only read-only binds
  of what the interpreter needs: the interpreter binary, the standard library (its
  site-packages hidden), /etc/ld.so.cache, the C.UTF-8 locale and the shared libraries the
  interpreter and the stdlib's extension modules link (found once with `ldd`; not those of
  tkinter, curses, readline and nis). No /proc (nothing of the parent's, nor /proc/self/mem
  to patch the interpreter with), no /dev, no /tmp, no shell, no compiler.
* a seccomp filter (a BPF program built here, loaded by bwrap just before it executes the
  interpreter) returns EPERM for: process creation (fork, vfork, clone without CLONE_THREAD;
  clone3 gets ENOSYS so that threads fall back to clone), execveat, memfd_create and
  memfd_secret, executable anonymous memory (mmap of PROT_EXEC|MAP_ANONYMOUS, mprotect and
  pkey_mprotect adding PROT_EXEC; shmget/shmat), socket and socketpair, ptrace and
  process_vm_*, namespace and mount calls, keyrings, bpf, perf_event_open, userfaultfd,
  io_uring and personality. x32 syscalls fail too; i386 ones (int 0x80) kill the process.

What closes what: secrets -- fresh environment, own pid namespace and no /proc; writes outside
/sandbox -- read-only binds on a read-only root, no host path visible except the read-only
interpreter files; native code -- noexec on /sandbox (dlopen's mmap fails), memfd_create
denied and no /proc/self/fd to dlopen through, no executable anonymous memory; processes --
seccomp; network -- empty network namespace and seccomp on socket(). execve itself cannot be
filtered (bwrap needs it to start the interpreter); without fork it can only replace the
sandboxed process with one of the few read-only binaries, inside the same boundary.

`process` -- WEAKER, explicit opt-in for hosts where user namespaces are not allowed (e.g. a
Kubernetes pod under the RuntimeDefault seccomp profile): a plain subprocess with the same
rlimits and audit hook, a minimal environment and a temporary working directory; the parent
makes itself non-dumpable (prctl PR_SET_DUMPABLE 0: its /proc files become root-owned, so
/proc/<ppid>/environ is unreadable), and when running as root the child runs as uid 65534.
It is not a security boundary: the child sees the host filesystem, and only the audit hook
stops writes, network, process creation and native code.

Both modes keep the resource limits (RLIMIT_CPU, an address-space cap, 64 file descriptors,
16 MiB of output, a wall-clock timeout that kills the process group) and run the same prelude:
an audit hook that refuses network access, process creation, native code, rlimit changes,
writes outside the working directory and reads of other processes' /proc files. It is defence
in depth: in `bwrap` mode the kernel layers above refuse the same attacks on their own (the
tests run every attack with and without it).

Fail closed: when the boundary cannot be built (no bwrap, unshare, mount or ldd; user
namespaces not permitted; an unsupported architecture) `run_sandboxed` raises
`SandboxUnavailableError` with a one-line reason and fix; it never falls back to `process`.
"""

from __future__ import annotations

import errno
import functools
import glob
import os
import platform
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODE_ENV = "FST_SANDBOX"
MODES = ("bwrap", "process")

# Inside the sandbox: the only writable directory (the working directory) and the user.
SANDBOX_DIR = "/sandbox"
SANDBOX_UID = 65534
_TMPFS_OPTIONS = "noexec,nosuid,nodev,size=16m,nr_inodes=4096,mode=0700"
_OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes of stdout/stderr (RLIMIT_FSIZE on their files)
_CHILD_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
_LOCALE = "/usr/lib/locale/C.utf8"

_FIX_BWRAP = "install bubblewrap (Debian: apt-get install bubblewrap)"
_FIX_USERNS = (
    "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and "
    "user.max_user_namespaces>0; Ubuntu 24.04+: kernel.apparmor_restrict_unprivileged_userns=0; "
    "in Kubernetes a seccomp profile that permits unshare/clone with CLONE_NEWUSER)"
)
_OPT_IN = f"or set {MODE_ENV}=process to accept the weaker process sandbox"


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot be set up here; nothing was run."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. `error` is None when the code exited normally."""

    ok: bool
    stdout: str
    error: str | None = None


# ----------------------------------------------------------------------------- prelude

# Written to stderr by the prelude before the untrusted code runs: its absence means the
# sandbox (or the interpreter) never started, which is a setup failure, not the code's.
_STARTED = "\x1efst-sandbox-started\n"

# Runs in the child before the untrusted code. An audit hook cannot be removed once added, so
# everything after it (the user code included) is subject to it. It refuses network access,
# process creation, native-code loading, rlimit changes, the gc introspection that could reach
# the hook's own function object and reads of other processes' /proc files; writes are only
# allowed under the working directory. Defence in depth: not a boundary on its own.
_GUARD = r"""
def _fst_install_guard():
    import os
    root = os.path.join(os.getcwd(), "")
    abspath, fsdecode = os.path.abspath, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    own_proc = ("/proc/self/", "/proc/thread-self/")
    reasons = (
        ("socket.", "network access is disabled"),
        ("subprocess.", "process creation is disabled"),
        ("os.system", "process creation is disabled"),
        ("os.exec", "process creation is disabled"),
        ("os.posix_spawn", "process creation is disabled"),
        ("os.spawn", "process creation is disabled"),
        ("os.fork", "process creation is disabled"),
        ("pty.", "process creation is disabled"),
        ("os.kill", "signalling other processes is disabled"),
        ("ctypes.", "native code is disabled"),
        ("resource.setrlimit", "changing resource limits is disabled"),
        ("resource.prlimit", "changing resource limits is disabled"),
        ("gc.get_", "heap introspection is disabled"),
        ("os.remove", "modifying files is disabled"),
        ("os.rename", "modifying files is disabled"),
        ("os.rmdir", "modifying files is disabled"),
        ("shutil.rmtree", "modifying files is disabled"),
        ("os.chmod", "modifying files is disabled"),
        ("os.chown", "modifying files is disabled"),
        ("os.truncate", "modifying files is disabled"),
        ("os.symlink", "modifying files is disabled"),
        ("os.link", "modifying files is disabled"),
    )
    # Tuples, not dicts: nothing the hook consults can be mutated from inside the sandbox.
    banned_modules = (
        ("ctypes", "native code is disabled"),
        ("_ctypes", "native code is disabled"),
        ("_posixsubprocess", "process creation is disabled"),
    )

    def outside(path):
        return not abspath(fsdecode(path)).startswith(root)

    def guard(event, args):
        for prefix, why in reasons:
            if event.startswith(prefix):
                raise PermissionError(f"sandbox: {event} blocked ({why})")
        if event == "import":
            for module, why in banned_modules:
                if args[0] == module:
                    raise PermissionError(f"sandbox: import of {module} blocked ({why})")
        elif event == "open" and not isinstance(args[0], int):
            path = abspath(fsdecode(args[0]))
            if path.startswith("/proc/") and not path.startswith(own_proc):
                raise PermissionError(f"sandbox: reading {args[0]!r} blocked (other processes)")
            mode, flags = args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if mode else bool(flags & write_flags)
            if writes and not path.startswith(root):
                raise PermissionError(f"sandbox: writing {args[0]!r} blocked (outside sandbox)")
        elif event == "os.mkdir" and (args[2] is not None or outside(args[0])):
            raise PermissionError(f"sandbox: creating {args[0]!r} blocked (outside sandbox)")
        elif event == "sqlite3.connect":
            db = fsdecode(args[0])
            if db not in ("", ":memory:") and (db.startswith("file:") or outside(db)):
                raise PermissionError(f"sandbox: opening database {db!r} blocked (outside sandbox)")

    sys.addaudithook(guard)

_fst_install_guard()
del _fst_install_guard
"""

_RUN = r"""
sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
_fst_src = sys.stdin.buffer.read().decode("utf-8")
sys.stderr.write(_FST_STARTED)
sys.stderr.flush()
del _FST_STARTED
exec(compile(_fst_src, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _prelude(audit_hook: bool) -> str:
    return f"import sys\n_FST_STARTED = {_STARTED!r}\n" + (_GUARD if audit_hook else "") + _RUN


# ----------------------------------------------------------------------------- seccomp

# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}; classic BPF over struct seccomp_data
# {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}.
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_CLONE_THREAD, _PROT_EXEC, _MAP_ANONYMOUS = 0x00010000, 0x4, 0x20

# What the filter does with each syscall it names (every other one is allowed). Numbers from
# asm/unistd_64.h (x86_64) and asm-generic/unistd.h (aarch64, which has no fork/vfork).
_SYSCALL_RULES = """
fork                 57     -   deny
vfork                58     -   deny
execveat            322   281   deny
memfd_create        319   279   deny
memfd_secret        447   447   deny
socket               41   198   deny
socketpair           53   199   deny
ptrace              101   117   deny
process_vm_readv    310   270   deny
process_vm_writev   311   271   deny
unshare             272    97   deny
setns               308   268   deny
mount               165    40   deny
umount2             166    39   deny
pivot_root          155    41   deny
chroot              161    51   deny
open_tree           428   428   deny
move_mount          429   429   deny
fsopen              430   430   deny
fsconfig            431   431   deny
fsmount             432   432   deny
fspick              433   433   deny
mount_setattr       442   442   deny
keyctl              250   219   deny
add_key             248   217   deny
request_key         249   218   deny
bpf                 321   280   deny
perf_event_open     298   241   deny
userfaultfd         323   282   deny
io_uring_setup      425   425   deny
io_uring_enter      426   426   deny
io_uring_register   427   427   deny
personality         135    92   deny
shmget               29   194   deny
shmat                30   196   deny
clone3              435   435   enosys
clone                56   220   threads-only
mmap                  9   222   no-anonymous-exec
mprotect             10   226   no-exec
pkey_mprotect       329   288   no-exec
"""
_ARCHES = {"x86_64": (0xC000003E, 1), "aarch64": (0xC00000B7, 2)}  # AUDIT_ARCH_*, column
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _arg(i: int) -> int:
    """Offset in seccomp_data of the low 32 bits of syscall argument i."""
    return 16 + 8 * i + (4 if sys.byteorder == "big" else 0)


@functools.cache
def seccomp_program(machine: str | None = None) -> bytes:
    """The sandbox's seccomp filter as a BPF program (the format bwrap's --seccomp reads)."""
    name = _MACHINES.get((machine or platform.machine()).lower())
    if name is None:
        raise SandboxUnavailableError(
            f"sandbox: no seccomp filter for architecture {machine or platform.machine()!r} "
            f"(supported: x86_64, aarch64); {_OPT_IN}"
        )
    audit_arch, column = _ARCHES[name]
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    prog = [
        _insn(_LD_W_ABS, 4),  # arch
        _insn(_JEQ, audit_arch, 1, 0),
        _insn(_RET, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0),  # syscall number
    ]
    if name == "x86_64":  # x32 ABI numbers carry bit 30
        prog += [_insn(_JGE, 0x40000000, 0, 1), _insn(_RET, eperm)]
    for line in _SYSCALL_RULES.strip().splitlines():
        fields = line.split()
        if fields[column] == "-":
            continue
        nr, rule = int(fields[column]), fields[3]
        if rule in ("deny", "enosys"):
            prog += [_insn(_JEQ, nr, 0, 1), _insn(_RET, eperm if rule == "deny" else enosys)]
        elif rule == "threads-only":  # clone: flags must include CLONE_THREAD
            prog += [
                _insn(_JEQ, nr, 0, 4),
                _insn(_LD_W_ABS, _arg(0)),
                _insn(_JSET, _CLONE_THREAD, 0, 1),
                _insn(_RET, _RET_ALLOW),
                _insn(_RET, eperm),
            ]
        elif rule == "no-anonymous-exec":  # mmap: file mappings are up to noexec mounts
            prog += [
                _insn(_JEQ, nr, 0, 6),
                _insn(_LD_W_ABS, _arg(2)),  # prot
                _insn(_JSET, _PROT_EXEC, 0, 3),
                _insn(_LD_W_ABS, _arg(3)),  # flags
                _insn(_JSET, _MAP_ANONYMOUS, 0, 1),
                _insn(_RET, eperm),
                _insn(_RET, _RET_ALLOW),
            ]
        else:  # no-exec: mprotect and pkey_mprotect never add PROT_EXEC
            prog += [
                _insn(_JEQ, nr, 0, 4),
                _insn(_LD_W_ABS, _arg(2)),  # prot
                _insn(_JSET, _PROT_EXEC, 0, 1),
                _insn(_RET, eperm),
                _insn(_RET, _RET_ALLOW),
            ]
    prog.append(_insn(_RET, _RET_ALLOW))
    return b"".join(prog)


# ----------------------------------------------------------------------------- filesystem


@dataclass(frozen=True)
class _Tree:
    """The read-only view of the host inside the sandbox."""

    python: str  # the interpreter binary, at the same path inside
    dirs: tuple[str, ...]  # directories bound read-only at the same path
    masked: tuple[str, ...]  # directories inside those hidden by an empty read-only tmpfs
    files: tuple[tuple[str, str], ...]  # (host source, path inside), read-only


def _base_python() -> str:
    # A venv's python is a symlink to (or copy of) the base interpreter; bind the real one.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


# Extension modules that cannot work in the sandbox (no display, terminal or network): the
# libraries only they link are left out (each bind costs ~0.5 ms per start); importing them
# fails with an ImportError.
_UNUSABLE = ("_tkinter", "_curses", "_curses_panel", "readline", "nis")


@functools.cache
def _python_tree(ldd: str) -> _Tree:
    python = _base_python()
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")
    dynload = os.path.realpath(dynload)
    dirs = [stdlib]
    if not dynload.startswith(os.path.join(stdlib, "")):
        dirs.append(dynload)
    if os.path.isdir(_LOCALE):  # LC_ALL=C.UTF-8 finds its data (the old sandbox's locale)
        dirs.append(_LOCALE)
    masked = tuple(
        d for d in (os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages"))
        if os.path.isdir(d)
    )  # fmt: skip
    modules = sorted(glob.glob(os.path.join(dynload, "*.so")))
    usable = [m for m in modules if os.path.basename(m).split(".")[0] not in _UNUSABLE]
    elves = [python, *usable]
    proc = subprocess.run(
        [ldd, *elves], capture_output=True, text=True, env={"PATH": os.defpath}, check=False
    )
    libs: set[str] = set()
    for line in proc.stdout.splitlines():
        target = line.split("=>", 1)[1] if "=>" in line else line
        path = target.strip().split(" (", 1)[0].strip()
        if path.startswith("/") and os.path.exists(path):
            libs.add(path)
    if not libs:
        raise SandboxUnavailableError(
            f"sandbox: `ldd {python}` listed no shared libraries ({_last_line(proc.stderr)}); "
            f"{_OPT_IN}"
        )
    if os.path.exists("/etc/ld.so.cache"):
        libs.add("/etc/ld.so.cache")
    inside_dirs = tuple(os.path.join(d, "") for d in dirs)
    files = tuple((os.path.realpath(p), p) for p in sorted(libs) if not p.startswith(inside_dirs))
    return _Tree(python, tuple(dirs), masked, files)


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Tools:
    bwrap: str
    unshare: str
    mount: str
    sh: str
    ldd: str


def _find_tools(path: str | None) -> _Tools:
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    found: dict[str, str] = {}
    for tool, package in (
        ("bwrap", "bubblewrap"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("sh", "dash"),
        ("ldd", "libc-bin"),
    ):
        exe = shutil.which(tool, path=search)
        if exe is None:
            fix = _FIX_BWRAP if tool == "bwrap" else f"install it (Debian package {package})"
            what = "bubblewrap ('bwrap')" if tool == "bwrap" else f"'{tool}'"
            raise SandboxUnavailableError(
                f"sandbox: {what} not found on PATH={search!r}; {fix}, {_OPT_IN}"
            )
        found[tool] = exe
    return _Tools(**found)


# sh -c script: $1 = mount, $2 = the directory to cover, then the bwrap command line.
_MOUNT_SCRIPT = (
    f'm=$1 w=$2; shift 2; "$m" -n -t tmpfs -o {_TMPFS_OPTIONS} fst-sandbox "$w" || exit 125; '
    'exec "$@"'
)


def _bwrap_command(
    tools: _Tools, tree: _Tree, work: str, seccomp_fd: int, info_fd: int, prelude: str
) -> list[str]:
    cmd = [tools.unshare, "--user", "--map-root-user", "--mount", "--"]
    cmd += [tools.sh, "-c", _MOUNT_SCRIPT, "fst-sandbox", tools.mount, work, tools.bwrap]
    cmd += ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net"]
    cmd += ["--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    # No --disable-userns: it writes /proc/sys/user/max_user_namespaces, read-only in a
    # container; the seccomp filter denies unshare, setns, clone and clone3 instead.
    cmd += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for key, value in _CHILD_ENV.items():
        cmd += ["--setenv", key, value]
    for d in tree.dirs:
        cmd += ["--ro-bind", d, d]
    for d in tree.masked:
        cmd += ["--tmpfs", d, "--remount-ro", d]
    for src, dest in tree.files:
        cmd += ["--ro-bind", src, dest]
    cmd += ["--ro-bind", tree.python, tree.python]
    cmd += ["--bind", work, SANDBOX_DIR, "--chdir", SANDBOX_DIR, "--remount-ro", "/"]
    cmd += ["--seccomp", str(seccomp_fd), "--info-fd", str(info_fd)]
    cmd += ["--", tree.python, "-I", "-S", "-B", "-c", prelude]
    return cmd


def _kill_namespace(proc: subprocess.Popen[bytes], info_fd: int) -> None:
    """On timeout, SIGKILL the sandbox's pid 1 (which takes its whole pid namespace along), so
    that bwrap reaps it and exits: killing bwrap first would orphan that init process (a
    zombie under our own pid 1, the trainer in a container). bwrap reported the pid on
    --info-fd; a pidfd plus a parent check make sure a recycled pid is never signalled."""
    try:
        os.set_blocking(info_fd, False)
        match = re.search(rb'"child-pid":\s*(\d+)', os.read(info_fd, 4096))
        if match is not None:
            pid = int(match.group(1))
            pidfd = os.pidfd_open(pid)
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                if ppid == proc.pid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    proc.wait(timeout=5.0)
            finally:
                os.close(pidfd)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        pass  # fall through to killing bwrap itself (--die-with-parent does the rest)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for `proc` to exit, at most `timeout_s`; False on timeout. A pidfd wakes us the
    moment it exits: Popen.wait(timeout) polls with sleeps of up to 50 ms, which used to add
    ~30 ms to every run."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # kernels before 5.3
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        if not select.select([pidfd], [], [], timeout_s)[0]:
            return False
    finally:
        os.close(pidfd)
    proc.wait()
    return True


def _limits(cpu_s: int, memory_bytes: int) -> Callable[[], None]:
    # Runs between fork and exec: keep it to plain setrlimit calls (no imports, no allocation
    # of note), because the parent may have threads (torch) holding locks at fork time.
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_OUTPUT_LIMIT, _OUTPUT_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# Keyed by plain int: a killed child's returncode is minus the signal number.
_SIGNALS: dict[int, str] = {
    signal.SIGXCPU: "cpu time limit exceeded",
    signal.SIGXFSZ: "output limit exceeded",
    signal.SIGKILL: "killed (SIGKILL)",
}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _setup_failure(mode: str, stderr: str, returncode: int) -> SandboxUnavailableError:
    line = _first_line(stderr) or f"exit status {returncode}"
    if mode == "process":
        return SandboxUnavailableError(f"sandbox: the interpreter did not start: {line}")
    bwrap_userns = line.startswith("bwrap:") and any(
        s in line for s in ("namespace", "uid map", "gid map")
    )
    mount_denied = line.startswith("mount:") and "ermission denied" in line
    if line.startswith("unshare:") or bwrap_userns or mount_denied:
        fix = f"{_FIX_USERNS}, {_OPT_IN}"
        return SandboxUnavailableError(f"sandbox: cannot create namespaces ({line}); {fix}")
    return SandboxUnavailableError(f"sandbox: bubblewrap sandbox did not start ({line}); {_OPT_IN}")


@functools.cache
def _make_parent_undumpable() -> None:
    # Non-dumpable: the kernel makes /proc/<our pid>/* root-owned, so a child running as our
    # uid cannot read our environment. Also stops same-uid ptrace (debuggers, py-spy).
    import ctypes  # the trusted parent; never in the sandbox

    pr_set_dumpable = 4
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise SandboxUnavailableError(
            f"sandbox: prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
        )


def sandbox_mode(mode: str | None = None) -> str:
    """The mode to use: `mode`, else $FST_SANDBOX, else "bwrap"."""
    chosen = mode if mode is not None else (os.environ.get(MODE_ENV) or "bwrap")
    if chosen not in MODES:
        raise SandboxUnavailableError(
            f"sandbox: unknown mode {chosen!r} (from {MODE_ENV} or mode=); use 'bwrap' "
            "(the isolation boundary, default) or 'process' (weaker, explicit opt-in)"
        )
    return chosen


def run_sandboxed(
    code: str,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    *,
    mode: str | None = None,
    path: str | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `code` in a fresh, isolated Python process and return what it printed.

    `mode` overrides $FST_SANDBOX ("bwrap", the default, or the weaker "process"); `path` is
    the PATH searched for bwrap, unshare, mount, sh and ldd (default: $PATH). `audit_hook=False`
    leaves out the in-interpreter guard: only for tests that check the layer beneath it.
    Limits: wall-clock `timeout_s` (everything is killed on expiry), RLIMIT_CPU, an
    address-space cap of `memory_mb`, 64 file descriptors, 16 MiB of output.
    Raises SandboxUnavailableError, without running anything, when the sandbox cannot be set up.
    """
    chosen = sandbox_mode(mode)
    prelude = _prelude(audit_hook)
    cpu_s = int(timeout_s) + 2
    popen: dict[str, Any] = {"preexec_fn": _limits(cpu_s, memory_mb * 1024 * 1024)}
    with tempfile.TemporaryDirectory(prefix="fst-sandbox-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        code_path = os.path.join(tmp, "code.py")
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        open_fds: list[int] = []
        try:
            if chosen == "bwrap":
                tools = _find_tools(path)
                tree = _python_tree(tools.ldd)
                program = seccomp_program()
                seccomp_fd, seccomp_write = os.pipe()
                open_fds.append(seccomp_fd)
                with open(seccomp_write, "wb") as f:  # < 1 KiB: fits in the pipe's buffer
                    f.write(program)
                info_fd, info_write = os.pipe()
                open_fds += [info_fd, info_write]
                cmd = _bwrap_command(tools, tree, work, seccomp_fd, info_write, prelude)
                popen.update(env={"PATH": os.defpath}, cwd=tmp, pass_fds=(seccomp_fd, info_write))
            else:
                _make_parent_undumpable()
                cmd = [sys.executable, "-I", "-S", "-B", "-c", prelude]
                popen.update(env=dict(_CHILD_ENV), cwd=work)
                if os.geteuid() == 0:  # never run untrusted code as root
                    os.chmod(tmp, 0o711)
                    os.chown(work, SANDBOX_UID, SANDBOX_UID)
                    popen.update(user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[])
            with open(code_path, "wb") as f:  # a file, not a pipe: nothing to feed or block on
                f.write(code.encode("utf-8"))
            with (
                open(code_path, "rb") as stdin,
                open(out_path, "wb") as out,
                open(err_path, "wb") as err,
            ):
                try:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=stdin,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,  # so a timeout can kill all the child started
                        **popen,
                    )
                except OSError as e:
                    why = f"sandbox: cannot start {cmd[0]}: {e.strerror}"
                    if "user" in popen:
                        why += (
                            f" (as root, the process sandbox runs the code as uid {SANDBOX_UID}, "
                            "which must be able to run the interpreter)"
                        )
                    raise SandboxUnavailableError(why) from e
            if chosen == "bwrap":  # bwrap has its own copy; ours would hide its EOF
                os.close(info_write)
                open_fds.remove(info_write)
            try:
                timed_out = not _wait(proc, timeout_s)
            finally:
                if proc.poll() is None:  # timed out, or interrupted (KeyboardInterrupt)
                    if chosen == "bwrap":
                        _kill_namespace(proc, info_fd)
                    else:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        finally:
            for fd in open_fds:
                os.close(fd)
        stdout = _read(out_path)
        stderr = _read(err_path)
    if stderr.startswith(_STARTED):
        stderr = stderr[len(_STARTED) :]
    elif not timed_out:
        raise _setup_failure(chosen, stderr, proc.returncode)
    if timed_out:
        return SandboxResult(False, stdout, f"timeout: killed after {timeout_s:g}s")
    status = proc.returncode
    if chosen == "bwrap" and 128 < status <= 128 + 64:  # bwrap: 128 + n for death by signal n
        status = 128 - status
    if status < 0:
        sig = -status
        why = _SIGNALS.get(sig, f"killed by signal {sig}")
        return SandboxResult(False, stdout, why)
    if status != 0:
        line = _last_line(stderr) or f"exit status {status}"
        if "MemoryError" in line:
            line = f"memory limit exceeded ({memory_mb} MB): {line}"
        elif "File too large" in line:  # Python ignores SIGXFSZ, so the write fails instead
            line = f"output limit exceeded: {line}"
        return SandboxResult(False, stdout, line)
    return SandboxResult(True, stdout, None)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(_OUTPUT_LIMIT).decode("utf-8", errors="replace")
