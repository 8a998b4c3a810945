"""Runs inside the jail: tries one thing per row and prints {row: outcome} as JSON.

An outcome is "ok" or the errno name the kernel answered with; the tests
compare each row with the exact answer the jail must give.
"""

import ctypes
import errno
import fcntl
import json
import os
import socket
import sys
import termios
import threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SERVER_PORT = int(sys.argv[1])


def sys_(number, *args):
    ret = libc.syscall(number, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def write(path):
    with open(path, "w") as f:
        f.write("x")


def sock(family, kind=socket.SOCK_STREAM):
    socket.socket(family, kind).close()


def connect_host_server():
    with socket.create_connection(("127.0.0.1", SERVER_PORT), timeout=2):
        return


def loopback_inside():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname(), timeout=2):
            srv.accept()[0].close()


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def thread():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x20000, 0x40000000, 17
r, w = os.pipe()
rows = {
    # denied by seccomp, explicitly (EPERM)
    "mount": lambda: sys_(165, b"none", b"/tmp", b"tmpfs", 0, 0),
    "umount2": lambda: sys_(166, b"/proc", 2),
    "unshare_user": lambda: sys_(272, CLONE_NEWUSER),
    "unshare_net": lambda: sys_(272, CLONE_NEWNET),
    "clone_newuser": lambda: sys_(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone_newns": lambda: sys_(56, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0),
    "setns": lambda: sys_(308, 0, 0),
    "ptrace_traceme": lambda: sys_(101, 0, 0, 0, 0),
    "keyctl": lambda: sys_(250, 0, 0, 0, 0, 0),
    "add_key": lambda: sys_(248, b"user", b"x", b"y", 1, -2),
    "bpf": lambda: sys_(321, 0, 0, 0),
    "perf_event_open": lambda: sys_(298, 0, 0, -1, -1, 0),
    "userfaultfd": lambda: sys_(323, 0),
    "io_uring_setup": lambda: sys_(425, 1, 0),
    "open_by_handle_at": lambda: sys_(304, 0, 0, 0),
    "chroot": lambda: sys_(161, b"/tmp"),
    "pivot_root": lambda: sys_(155, b"/tmp", b"/tmp"),
    "setuid_root": lambda: sys_(105, 0),
    "personality": lambda: sys_(135, 0x0040000),
    "tiocsti": lambda: attempt(lambda: fcntl.ioctl(r, termios.TIOCSTI, b"x")),
    "tiocsti_high_bits": lambda: sys_(16, r, termios.TIOCSTI | (1 << 32), 0),
    # answered EAFNOSUPPORT: families a network namespace does not isolate
    "socket_vsock": lambda: attempt(lambda: sock(40)),
    "socket_packet": lambda: attempt(lambda: sock(17, socket.SOCK_RAW)),
    "socket_netlink": lambda: attempt(lambda: sock(16, socket.SOCK_RAW)),
    # not on the allowlist at all (ENOSYS)
    "clone3": lambda: sys_(435, 0, 0),
    "kcmp": lambda: sys_(312, 0, 0, 0, 0, 0),
    "sync": lambda: sys_(162),
    # denied (EPERM): syncfs is sync's lever too; inotify would watch which files of the shared /usr others open
    "syncfs": lambda: sys_(306, os.open("/work", os.O_RDONLY)),
    "inotify_init1": lambda: sys_(294, 0),
    "inotify_add_watch": lambda: sys_(254, 0, b"/usr", 1),
    # the filesystem
    "read_shadow": lambda: attempt(lambda: open("/etc/shadow").close()),
    "read_host_root_home": lambda: attempt(lambda: os.listdir("/root")),
    "write_usr": lambda: attempt(lambda: write("/usr/x")),
    "write_root": lambda: attempt(lambda: write("/x")),
    "write_etc_passwd": lambda: attempt(lambda: write("/etc/passwd")),
    "write_proc_sys": lambda: attempt(lambda: write("/proc/sys/kernel/hostname")),
    "create_in_dev": lambda: attempt(lambda: write("/dev/x")),
    "mknod_char_device": lambda: attempt(lambda: os.mknod("/tmp/mem", 0o600 | 0o020000, os.makedev(1, 1))),
    # network: the host's loopback is another namespace's
    "connect_host_server": lambda: attempt(connect_host_server),
    # the allowed twins: a broken jail that refuses everything fails these
    "thread": lambda: attempt(thread),
    "fork": lambda: attempt(fork),
    "socket_unix": lambda: attempt(lambda: sock(socket.AF_UNIX)),
    "socket_inet6": lambda: attempt(lambda: sock(socket.AF_INET6)),
    "loopback_inside": lambda: attempt(loopback_inside),
    "ioctl_fionread": lambda: attempt(lambda: fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0")),
    "write_work": lambda: attempt(lambda: write("/work/x")),
    "fsync_work": lambda: attempt(lambda: os.fsync(os.open("/work", os.O_RDONLY))),
    "write_tmp": lambda: attempt(lambda: write("/tmp/x")),
    "write_dev_shm": lambda: attempt(lambda: write("/dev/shm/x")),
    "write_dev_null": lambda: attempt(lambda: write("/dev/null")),
    "read_etc_passwd": lambda: attempt(lambda: open("/etc/passwd").close()),
    "mkfifo_tmp": lambda: attempt(lambda: os.mkfifo("/tmp/fifo")),
}
result = {name: fn() for name, fn in rows.items()}
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
result["status"] = {k: status[k].strip() for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
result["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
# if_nameindex needs netlink, which is denied
result["interfaces"] = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
result["hostname"] = socket.gethostname()
result["mounts"] = {line.split()[4]: line.split()[5] for line in open("/proc/self/mountinfo")}
result["root"] = sorted(os.listdir("/"))
print(json.dumps(result))
