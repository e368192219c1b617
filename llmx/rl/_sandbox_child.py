"""The child side of llmx.rl.sandbox: run untrusted code, one evaluation per process.

Started as `python -I -S -B _sandbox_child.py` with an empty environment. Reads one request (marshal, written
by the trusted parent) from stdin, isolates itself, runs the code and the calls, and writes one line of
ASCII JSON per step to its stdout (the result channel); everything the untrusted code prints goes to stderr
(the output channel). Imports only what the interpreter already has or what is cheap (no json, no signal:
both pull in re/enum, ~10 ms per start); ctypes only when namespaces are used.

Lines on the result channel:
  {"layers": [...]}                       once, the isolation layers that are active
  {"defined": true} | {"defined": false, "e": "..."}
  {"i": k, "ok": true, "v": VALUE} | {"i": k, "ok": false, "e": "..."}   one per call
VALUE is a tagged plain value (see _encode); nothing is ever pickled.
"""

import marshal
import os
import sys

import _signal
import resource

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
MAX_DEPTH = 64


class CallTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` in the code does not swallow it."""


class CpuLimit(BaseException):
    """Raised by SIGXCPU (the soft RLIMIT_CPU): pid 1 of a PID namespace would ignore the default action."""


class TooLarge(Exception):
    pass


def _write(fd, text):
    data = text.encode("ascii")
    while data:
        data = data[os.write(fd, data):]


def _q(s):
    # Strings travel as hex of their UTF-8 bytes: no escaping to get wrong, lone surrogates survive.
    return '"' + s.encode("utf-8", "surrogatepass").hex() + '"'


def _encode(v, out, depth, budget):
    """Tagged JSON of a plain value: ["i", hex], ["f", float.hex], ["s", hex utf8], ["y", hex], ["l"|"t"|"S"|"F",
    [...]], ["d", [[k, v], ...]], null, true, false; anything else ["u", type name]."""
    if depth > MAX_DEPTH:
        raise TooLarge("nested deeper than %d" % MAX_DEPTH)
    if len(out) > budget:
        raise TooLarge("value larger than the limit")
    if v is None:
        out.append("null")
    elif v is True or v is False:
        out.append("true" if v else "false")
    elif isinstance(v, int) and not isinstance(v, bool):
        out.append('["i","%s"]' % format(int.__index__(v), "x"))
    elif isinstance(v, float):
        out.append('["f","%s"]' % float.hex(float(v)))
    elif isinstance(v, str):
        out.append('["s",' + _q(str.__str__(v)) + "]")
    elif isinstance(v, (bytes, bytearray)):
        out.append('["y","' + bytes(v).hex() + '"]')
    elif isinstance(v, dict):
        out.append('["d",[')
        for n, (k, x) in enumerate(dict.items(v)):
            out.append("," if n else "")
            out.append("[")
            _encode(k, out, depth + 1, budget)
            out.append(",")
            _encode(x, out, depth + 1, budget)
            out.append("]")
        out.append("]]")
    elif isinstance(v, (list, tuple, set, frozenset)):
        tag = "l" if isinstance(v, list) else "t" if isinstance(v, tuple) else "F" if isinstance(v, frozenset) else "S"
        out.append('["%s",[' % tag)
        for n, x in enumerate(v):
            out.append("," if n else "")
            _encode(x, out, depth + 1, budget)
        out.append("]]")
    else:
        out.append('["u",' + _q(type(v).__name__) + "]")


def encode(v, budget):
    out = []
    try:
        _encode(v, out, 0, budget)
    except (TooLarge, RecursionError) as e:
        return '["u",' + _q("%s: %s" % (type(v).__name__, e)) + "]"
    text = "".join(out)
    if len(text) > budget:
        return '["u",' + _q("%s: value larger than the limit" % type(v).__name__) + "]"
    return text


def short_error(e):
    if isinstance(e, CallTimeout):
        return "timeout"
    if isinstance(e, CpuLimit):
        return "cpu time limit"
    msg = "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__
    return msg[:300]


# ---------------------------------------------------------------- isolation layers


def python_dirs():
    """What the interpreter needs to read to import the standard library (with -I -S: nothing else)."""
    return [os.path.realpath(p) for p in sys.path if os.path.isdir(p)]


def _mount(libc, src, target, fstype, flags, data):
    arg = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(arg(src), arg(target), arg(fstype), flags, arg(data)) != 0:
        raise OSError("mount %s failed" % target)


def enter_namespaces(req, layers):
    """New user, mount, network, IPC, UTS and PID namespaces; root and every other mount read-only; private
    tmpfs on /tmp (the cwd), /var/tmp, /dev/shm; every top-level entry not in req["visible"] replaced by an empty
    tmpfs (or /dev/null), except the Python installation, bound back read-only. Returns in the grandchild,
    which is pid 1 of the new PID namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
        fd = os.open("/proc/self/" + name, os.O_WRONLY)
        os.write(fd, text.encode())
        os.close(fd)
    layers += ["user_namespace", "mount_namespace", "net_namespace", "ipc_namespace", "uts_namespace"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    # Everything at the top level that is not in the visible list disappears: directories under an empty
    # tmpfs, files under /dev/null. An allowlist, so that unknown directories on a machine are hidden too.
    hidden, files = [], []
    for name in sorted(os.listdir("/")):
        p = "/" + name
        if p in req["visible"] or os.path.islink(p):
            continue
        (hidden if os.path.isdir(p) else files).append(p)
    keep = []  # the Python installation inside a hidden dir: opened now, bound back after hiding
    for p in sorted(python_dirs()):
        inside = any((p + "/").startswith(d + "/") for d in hidden)
        if inside and not any((p + "/").startswith(k + "/") for k, _ in keep):
            keep.append((p, os.open(p, os.O_RDONLY | os.O_DIRECTORY)))
    for d in hidden:
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for f in files:
        if libc.mount(b"/dev/null", f.encode(), None, MS_BIND, None) == 0:
            hidden.append(f)
    for p, fd in keep:
        os.makedirs(p, exist_ok=True)
        _mount(libc, "/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC, None)
        os.close(fd)
    layers.append("hidden:" + ",".join(hidden))
    ro = 0
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    bound = [k for k, _ in keep]

    def shadowed(p):  # under a hidden dir (unreachable, cannot be remounted) or under /proc
        if p == "/proc" or p.startswith("/proc/"):
            return True
        return any(p.startswith(d + "/") for d in hidden) and not any((p + "/").startswith(k + "/") for k in bound)

    points = [p for p in points if not shadowed(p)]
    for p in points:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        ro += libc.mount(None, p.encode(), None, flags, None) == 0
    if ro:
        layers.append("read_only_mounts:%d/%d" % (ro, len(points)))
    size = "size=%dk,mode=1777" % max(64, req["limits"]["tmp_kb"])
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, size)
    layers.append("private_tmp")
    pid = os.fork()
    if pid:  # the middle process: wait, then die the way pid 1 died (the parent decodes the status)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
                _signal.signal(sig, _signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status))
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # the parent kills the middle process; pid 1 must follow
    os.setsid()  # so that kill(0, ...) by the code reaches only itself, not the middle process
    layers.append("pid_namespace")
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV, None)
        layers.append("private_proc")
    except OSError:
        pass
    os.chdir("/tmp")
    # The code must not reach ctypes through sys.modules (the audit hook also refuses it).
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def set_limits(lim, layers):
    mb = 1024 * 1024
    pairs = [
        (resource.RLIMIT_CPU, int(lim["cpu_s"] + 0.999), int(lim["cpu_s"] + 0.999) + 1),
        (resource.RLIMIT_AS, lim["memory_mb"] * mb, lim["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, int(lim["fsize_mb"] * mb), int(lim["fsize_mb"] * mb)),
        (resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]),
        (resource.RLIMIT_NPROC, lim["nproc"] + 1, lim["nproc"] + 1),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for which, soft, hard in pairs:
        resource.setrlimit(which, (soft, hard))
    layers.append("rlimits")


class BoundedWriter:
    """sys.stdout/sys.stderr of the code: keeps the first `limit` bytes, drops the rest without blocking."""

    def __init__(self, fd, limit):
        self.fd, self.left = fd, limit

    def write(self, s):
        if self.left > 0:
            data = str(s).encode("utf-8", "replace")[: self.left]
            self.left -= len(data)
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                self.left = 0
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False


REFUSED = (
    "socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "os.setuid", "os.setgid", "os.chroot",
    "os.putenv", "os.unsetenv", "sys.setprofile", "sys.settrace", "sys.addaudithook",
    "urllib.", "ftplib.", "http.", "smtplib.", "webbrowser.", "pty.", "mmap.", "syslog.", "resource.setrlimit",
    "os.chown", "os.link", "os.symlink", "winreg.", "msvcrt.", "sqlite3.",
)
REFUSED_IMPORTS = {
    "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket", "multiprocessing", "_multiprocessing",
    "pty", "fcntl", "mmap", "_thread", "threading", "resource", "gc", "_xxsubinterpreters", "asyncio",
    "ssl", "_ssl", "select", "selectors",
}
PATH_EVENTS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod",
               "os.truncate", "os.utime", "os.chdir", "shutil.copyfile", "shutil.move", "shutil.rmtree", "glob.glob"}


def install_audit_hook(tmp, readable):
    """Second layer (bypassable in principle, so never the only one): refuse processes, signals, sockets, ctypes,
    and file access outside the private temp dir (reads also allowed inside the Python installation)."""
    tmp = os.path.realpath(tmp) + "/"
    readable = tuple(os.path.realpath(p) + "/" for p in readable)
    realpath, fspath, isinstance_, str_ = os.path.realpath, os.fspath, isinstance, str

    def hook(event, args):
        if event in PATH_EVENTS:
            path = args[0] if args else None
            if isinstance_(path, int):
                return  # an already open descriptor
            try:
                p = realpath(fspath(path)) if path is not None else ""
            except Exception:
                raise PermissionError("sandbox: refused %s" % event)
            if (p + "/").startswith(tmp):
                return
            if event == "open":
                mode = args[1] if len(args) > 1 and isinstance_(args[1], str_) else ""
                flags = args[2] if len(args) > 2 and isinstance_(args[2], int) else 0
                reading = not any(c in mode for c in "wax+") and not flags & 3
            else:
                reading = event in ("os.listdir", "os.scandir")
            if reading and (p + "/").startswith(readable):
                return
            raise PermissionError("sandbox: refused %s %r" % (event, path))
        if event == "import":
            if args[0].split(".")[0] in REFUSED_IMPORTS:
                raise ImportError("sandbox: refused import %s" % args[0])
            return
        if event.startswith(REFUSED):
            raise PermissionError("sandbox: refused %s" % event)

    sys.addaudithook(hook)


# ---------------------------------------------------------------- main


def main():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    req = marshal.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    os.dup2(2, 1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    layers = ["setsid", "empty_env"]
    if req["namespaces"]:
        enter_namespaces(req, layers)
        tmp = "/tmp"
    else:
        tmp = os.getcwd()
    lim = req["limits"]
    set_limits(lim, layers)
    budget = lim["value_kb"] * 1024
    sys.stdout = sys.stderr = BoundedWriter(2, lim["output_kb"] * 1024)

    def on_alarm(signum, frame):
        raise CallTimeout()

    def on_xcpu(signum, frame):
        raise CpuLimit()

    _signal.signal(_signal.SIGALRM, on_alarm)
    _signal.signal(_signal.SIGXCPU, on_xcpu)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # a too-large file is an OSError of that call, not a kill
    if lim["audit_hook"]:
        install_audit_hook(tmp, python_dirs())
        layers.append("audit_hook")
    _write(result_fd, '{"layers":[%s]}\n' % ",".join(_q(x) for x in layers))

    timeout = lim["call_timeout_s"]
    ns = {"__name__": "__sandbox__"}
    try:
        _signal.setitimer(_signal.ITIMER_REAL, timeout)
        exec(compile(req["code"], "<code>", "exec"), ns)
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _write(result_fd, '{"defined":true}\n')
    except BaseException as e:  # noqa: B036 - anything the code raises is a result, SystemExit included
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        kind = "syntax error" if isinstance(e, SyntaxError) else short_error(e)
        if isinstance(e, SyntaxError):
            kind = "syntax error: %s (line %s)" % (e.msg, e.lineno)
        _write(result_fd, '{"defined":false,"e":%s}\n' % _q(kind[:300]))
        os._exit(0)
    for i, call in zip(req["indices"], req["calls"]):
        try:
            _signal.setitimer(_signal.ITIMER_REAL, timeout)
            value = eval(call, ns)
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            line = '{"i":%d,"ok":true,"v":%s}\n' % (i, encode(value, budget))
        except BaseException as e:  # noqa: B036
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            line = '{"i":%d,"ok":false,"e":%s}\n' % (i, _q(short_error(e)))
        _write(result_fd, line)
    os._exit(0)  # no atexit handlers or finalizers the code may have registered


if __name__ == "__main__":
    main()
