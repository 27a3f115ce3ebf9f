#!/usr/bin/env python3
"""cockerinit: PID 1 of a cocker container.

cocker loads this file on the host and its boot child, PID 1 of the container's new
namespaces, calls serve_container() before the container root is entered (it also runs as
a program: main()).  Every module it will ever need is imported here first, and imports
are shut off before the root is entered, because the image may hold no Python at all, and
one planted in it must never run.  Then it

  1. makes itself non-dumpable, so that /proc/1/exe, /proc/1/map_files and ptrace give a
     container process nothing of the host (CVE-2019-5736);
  2. binds the control socket in the container's directory on the host (reachable by root
     on the host, invisible inside the container);
  3. pivots into the container root and detaches the old root;
  4. confines itself, and so every process of the container (confine(), each step checked):
     a. the bounding set shrinks to Podman's default capabilities;
     b. the seccomp filter is installed (while CAP_SYS_ADMIN still allows it without
        no_new_privs), unless the container runs with --seccomp unconfined;
     c. permitted and effective sets become the same capabilities, inheritable and ambient
        empty;
     (a user namespace would come before a., no_new_privs is set by each exec with
     --no-new-privs, last before execve);
  5. waits until cocker says, with GO on the ready channel, that the host side is complete
     (and, where the monitor moves PID 1 into its cgroups, that the move is done), starts
     the main command, and reports READY there;
  6. serves attach (a login shell on a pty) and run (a command on pipes, exit status sent
     back) sessions, each in a process of its own, reaps every orphan, and with -e runs the
     main command and stops the container when it ends.

cocker's file helpers (putfile, getfile, rplfile) load this file as a module and call the
same confine(), so they run with no more power than the container's own processes.

It ends on SIGTERM (from cocker shutdown through the monitor: SIGTERM to everything, SIGKILL
after a grace period), when the -e command ends, or when the monitor is gone (EOF on the
alive pipe).  Standard library only, Python 3.6 and newer; it never imports cocker.py.
"""

VERSION = '1.0.0'

import ctypes
import fcntl
import os
import select
import _signal                  # (not signal, socket: their enums cost 10 ms a boot)
import _socket
import stat
import struct
import sys
import termios
import time
import tty

# =============================================================================
# Constants
# =============================================================================

#: set by cocker's boot child: the root, the socket's directory, the hostname, the -e
#: command, the confinement and the descriptors it hands over (COCKER_ALIVE_PIPE is the C
#: cocker's name; COCKER_SOCKDIR_FD: the socket's directory where PID 1 has no path to it)
CONFIG_ENV = ('COCKER_ROOT', 'COCKER_SOCKDIR', 'COCKER_HOSTNAME', 'COCKER_EXEC', 'COCKER_MAIN',
              'COCKER_SECCOMP', 'COCKER_NO_NEW_PRIVS',
              'COCKER_READY_FD', 'COCKER_LOG_FD', 'COCKER_CONSOLE_FD', 'COCKER_ALIVE_PIPE',
              'COCKER_ALIVE_FD', 'COCKER_STDIN_FD', 'COCKER_STDOUT_FD', 'COCKER_STDERR_FD',
              'COCKER_TTY', 'COCKER_CGROUPS_FD', 'COCKER_SERVED_FD', 'COCKER_SOCKDIR_FD')
SOCKET_NAME = 'cocker.sock'
READY = b'READY'
GO = b'G'                             #: cocker's word that the host side is complete
STOP_GRACE = 5                        #: seconds between SIGTERM and SIGKILL at shutdown
STOP_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)  #: each stops the container
REQUEST_TIMEOUT = 10                  #: a client must send its request within this
INPUT_LIMIT = 1 << 20                 #: input held for a command before the client must wait
EXIT_LINGER = 0.2                     #: output still read this long after a command exits
BUFSIZE = 65536
NO_NEW_PRIVS = False                  #: --no-new-privs: set by main() from COCKER_NO_NEW_PRIVS
SESSION_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
SHELLS = ('/bin/bash', '/bin/sh', '/usr/bin/bash', '/usr/bin/sh')
#: an imported image's command, environment, working directory and user (cocker's cp/main):
#: {'arg': [...], 'env': ['K=V', ...], 'cwd': path or None, 'user': text or None}
IMAGE = {'arg': [], 'env': [], 'cwd': None, 'user': None, 'stop': None}
MAIN_STDIO = []                             #: a one-shot run's stdin, stdout, stderr
TTY = False                                 #: ... and they are a terminal (COCKER_TTY)
USER_FILE_MAX = 4 << 20                 #: the largest /etc/passwd or /etc/group read
ID_LIMIT = (1 << 32) - 1                #: uids and gids are below (-1 means "unchanged")

#: Podman's default capability set (Docker's without MKNOD, NET_RAW and AUDIT_WRITE):
#: everything else leaves every set, bounding included
KEEP_CAPS = {
    0,   # CHOWN
    1,   # DAC_OVERRIDE
    3,   # FOWNER
    4,   # FSETID
    5,   # KILL
    6,   # SETGID
    7,   # SETUID
    8,   # SETPCAP
    10,  # NET_BIND_SERVICE
    18,  # SYS_CHROOT
    31,  # SETFCAP
}

PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MNT_DETACH = 2
SYS_PIVOT_ROOT = {'x86_64': 155, 'aarch64': 41, 'ppc64le': 203, 's390x': 217, 'i686': 217,
                  'armv7l': 218, 'riscv64': 41}

# =============================================================================
# Messages
# =============================================================================
# stdout and stderr are a pipe to the monitor, which appends to the container's
# cockerinit.log on the host (outside the container's files, so it never ends up in images).

def log(text, level='INFO'):
    now = time.time()
    line = '%s.%06d | %-5s | %d:cockerinit.py:%d | %s\n' % (
        time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)), int(now % 1 * 1e6),
        level, os.getpid(), sys._getframe(1).f_lineno, text)
    try:
        os.write(2, line.encode('utf-8', 'replace'))
    except OSError:
        pass


# =============================================================================
# libc bindings
# =============================================================================

_libc = ctypes.CDLL(None, use_errno=True)


class CapHeader(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32),
                ('inheritable', ctypes.c_uint32)]


def _check(result, what):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, '%s: %s' % (what, os.strerror(err)))
    return result


def prctl(option, arg2=0, arg3=0):
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), 'prctl(%d)' % option)


def pivot_root(new_root, put_old):
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        _check(_libc.pivot_root(new_root.encode(), put_old.encode()), 'pivot_root')
    else:
        _check(_libc.syscall(ctypes.c_long(number), ctypes.c_char_p(new_root.encode()),
                             ctypes.c_char_p(put_old.encode())), 'pivot_root')


def umount2(target, flags):
    _check(_libc.umount2(target.encode(), flags), 'umount2 %s' % target)


def capset(mask):
    """Permitted and effective sets = mask; inheritable empty."""
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xffffffff
    data[1].effective = data[1].permitted = mask >> 32
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), 'capset')


def capget():
    """(permitted, effective, inheritable) masks of this process."""
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), ctypes.byref(data)), 'capget')
    return tuple(getattr(data[0], k) | getattr(data[1], k) << 32
                 for k in ('permitted', 'effective', 'inheritable'))


def prctl_value(option, arg2=0):
    """prctl's own return value (PR_GET_SECCOMP, PR_CAPBSET_READ)."""
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0)), 'prctl(%d)' % option)


# =============================================================================
# Confinement
# =============================================================================
# What PID 1 applies to itself, and so to every process of the container; cocker's file
# helpers apply the same to themselves.  The seccomp filter is classic BPF: the
# architecture first (another ABI must not reach the system calls under other numbers),
# then one test per denied call, then the calls denied only with some arguments.

SECCOMP_RET_ALLOW = 0x7fff0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
AUDIT_ARCH = {'x86_64': 0xc000003e, 'aarch64': 0xc00000b7}
X32_SYSCALL_BIT = 0x40000000            #: x32 calls arrive on x86_64's arch with this bit

#: name: (x86_64, aarch64) numbers; None where the architecture never had the call
SYSCALLS = {
    'acct': (163, 89), 'add_key': (248, 217), 'bpf': (321, 280), 'clone': (56, 220),
    'clone3': (435, 435), 'create_module': (174, None), 'delete_module': (176, 106),
    'fanotify_init': (300, 262), 'finit_module': (313, 273), 'fsconfig': (431, 431),
    'fsmount': (432, 432), 'fsopen': (430, 430), 'fspick': (433, 433),
    'get_kernel_syms': (177, None), 'init_module': (175, 105), 'io_uring_enter': (426, 426),
    'io_uring_register': (427, 427), 'io_uring_setup': (425, 425), 'ioperm': (173, None),
    'iopl': (172, None), 'kcmp': (312, 272), 'kexec_file_load': (320, 294),
    'kexec_load': (246, 104), 'keyctl': (250, 219), 'lookup_dcookie': (212, 18),
    'mount': (165, 40), 'mount_setattr': (442, 442), 'move_mount': (429, 429),
    'nfsservctl': (180, 42), 'open_by_handle_at': (304, 265), 'open_tree': (428, 428),
    'open_tree_attr': (467, 467), 'perf_event_open': (298, 241), 'personality': (135, 92),
    'pivot_root': (155, 41), 'query_module': (178, None), 'quotactl': (179, 60),
    'quotactl_fd': (443, 443), 'reboot': (169, 142), 'request_key': (249, 218),
    'setns': (308, 268), 'socket': (41, 198), 'swapoff': (168, 225), 'swapon': (167, 224),
    'syslog': (103, 116),
    'sysfs': (139, None), '_sysctl': (156, None), 'umount2': (166, 39),
    'unshare': (272, 97), 'userfaultfd': (323, 282), 'uselib': (134, None),
    'ustat': (136, None), 'vhangup': (153, 58),
}
#: never allowed: the kernel surface Docker's default profile keeps from a container
#: without CAP_SYS_ADMIN (keyrings are not namespaced; the rest reaches past namespaces)
DENIED = ('acct', 'add_key', 'bpf', 'create_module', 'delete_module', 'fanotify_init',
          'finit_module', 'fsconfig', 'fsmount', 'fsopen', 'fspick', 'get_kernel_syms',
          'init_module', 'io_uring_enter', 'io_uring_register', 'io_uring_setup', 'ioperm',
          'iopl', 'kcmp', 'kexec_file_load', 'kexec_load', 'keyctl', 'lookup_dcookie', 'mount',
          'mount_setattr', 'move_mount', 'nfsservctl', 'open_by_handle_at', 'open_tree',
          'open_tree_attr', 'perf_event_open', 'pivot_root', 'query_module', 'quotactl',
          'quotactl_fd', 'reboot', 'request_key', 'setns', 'swapoff', 'swapon', 'syslog',
          'sysfs', '_sysctl', 'umount2', 'userfaultfd', 'uselib', 'ustat', 'vhangup')
#: clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc use clone
NOT_IMPLEMENTED = ('clone3',)
#: CLONE_NEW* flags: no new namespace (a user namespace above all) from inside
NAMESPACE_FLAGS = 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | \
    0x40000000 | 0x00020000                 # CGROUP UTS IPC USER PID NET NS
CLONE_NEWTIME = 0x80                        #: in unshare's flags (in clone's, the signal)
AF_VSOCK = 40                               #: the hypervisor's sockets: no network namespace
#: (call, test of its first argument's low word, value): refused when the test holds
REFUSED_ARGUMENTS = (('clone', 'any of', NAMESPACE_FLAGS),
                     ('unshare', 'any of', NAMESPACE_FLAGS | CLONE_NEWTIME),
                     ('socket', 'equal to', AF_VSOCK))
#: personality values Docker allows: Linux, UNAME26, ADDR_NO_RANDOMIZE, both, and a query
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xffffffff)

BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARG0 = 0, 4, 16


def bpf_stmt(code, k, jt=0, jf=0):
    return (code, jt, jf, k)


def seccomp_program(machine):
    """The filter for this machine, as (code, jt, jf, k) instructions; None where cocker
    has no system call table for it."""
    if machine not in AUDIT_ARCH:
        return None
    column = 0 if machine == 'x86_64' else 1
    number = dict((name, numbers[column]) for name, numbers in SYSCALLS.items())
    deny = bpf_stmt(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM)
    allow = bpf_stmt(BPF_RET_K, SECCOMP_RET_ALLOW)
    prog = [bpf_stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
            bpf_stmt(BPF_JEQ_K, AUDIT_ARCH[machine], jt=1), deny,
            bpf_stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR)]
    if machine == 'x86_64':
        prog += [bpf_stmt(BPF_JGE_K, X32_SYSCALL_BIT, jf=1), deny]
    for names, errno in ((DENIED, EPERM), (NOT_IMPLEMENTED, ENOSYS)):
        for name in names:
            if number[name] is not None:
                prog += [bpf_stmt(BPF_JEQ_K, number[name], jf=1),
                         bpf_stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno)]
    # the flags and the address family are the low word of the first argument (the kernel
    # reads no more of it); every path of these blocks returns
    for name, test, value in REFUSED_ARGUMENTS:
        prog += [bpf_stmt(BPF_JEQ_K, number[name], jf=4),
                 bpf_stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARG0),
                 bpf_stmt(BPF_JSET_K if test == 'any of' else BPF_JEQ_K, value, jf=1),
                 deny, allow]
    prog.append(bpf_stmt(BPF_JEQ_K, number['personality'], jf=len(PERSONALITIES) + 3))
    prog.append(bpf_stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARG0))
    for i, value in enumerate(PERSONALITIES):
        prog.append(bpf_stmt(BPF_JEQ_K, value, jt=len(PERSONALITIES) - i))
    prog += [deny, allow, allow]
    return prog


#: struct sock_filter (code, jt, jf, k), as the kernel reads an instruction
SOCK_FILTER = struct.Struct('=HBBI')
#: machine -> its filter packed, made once by a process: a monitor's PID 1s are its forks
PACKED_FILTERS = {}


class SockFprog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]


def packed_filter(machine):
    """seccomp_program(machine) as the kernel takes it, or None (no table for it)."""
    if machine not in PACKED_FILTERS:
        prog = seccomp_program(machine)
        PACKED_FILTERS[machine] = prog and b''.join(SOCK_FILTER.pack(*i) for i in prog)
    return PACKED_FILTERS[machine]


def install_seccomp(packed):
    """Load the filter on this process (its children inherit it) and check it holds."""
    filters = ctypes.create_string_buffer(packed, len(packed))
    fprog = SockFprog(len(packed) // SOCK_FILTER.size, ctypes.addressof(filters))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    if prctl_value(PR_GET_SECCOMP) != SECCOMP_MODE_FILTER:
        raise OSError(EPERM, 'the seccomp filter did not take')


def confine(last_cap, seccomp=True):
    """Podman's capabilities in every set and, unless switched off, the seccomp filter;
    every step is checked.  Needs CAP_SYS_ADMIN on entry (the filter goes in before it
    leaves), leaves nothing of the host's power."""
    keep = sum(1 << cap for cap in KEEP_CAPS)
    for cap in range(last_cap + 1):
        if cap not in KEEP_CAPS:
            prctl(PR_CAPBSET_DROP, cap)
    if any(prctl_value(PR_CAPBSET_READ, cap) for cap in range(last_cap + 1)
           if cap not in KEEP_CAPS):
        raise OSError(EPERM, 'a capability stayed in the bounding set')
    if seccomp:
        packed = packed_filter(os.uname().machine)
        if packed is None:
            raise OSError(ENOSYS, 'no seccomp filter for %s (--seccomp unconfined runs '
                          'without one)' % os.uname().machine)
        install_seccomp(packed)
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass                                        # kernels before 4.3 have no ambient set
    capset(keep)
    if capget() != (keep, keep, 0):
        raise OSError(EPERM, 'the capability sets are not the expected ones')


# =============================================================================
# Protocol
# =============================================================================
# Frames: 1 type byte, 4-byte big-endian length, payload (the same as in cocker.py).
#   client -> init: R request (fields), I input bytes, C input closed, W window size (4 x u16)
#   init -> client: O stdout bytes, E stderr bytes, X exit status (fields), M error text
# Fields are 'key=value' strings separated by NUL bytes.  frame, pack_fields, unpack_fields
# and split_frames are cocker.py's, line for line (each script carries the wire protocol
# itself); only the error split_frames raises is this file's own.

FRAME = struct.Struct('>cI')
FRAME_MAX = 1 << 20


def frame(kind, payload=b''):
    return FRAME.pack(kind, len(payload)) + payload


def send_frame(sock, kind, payload=b''):
    sock.sendall(frame(kind, payload))


def pack_fields(fields):
    return b'\0'.join(('%s=%s' % (k, v)).encode('utf-8', 'surrogateescape')
                       for k, v in fields.items() if v is not None)


def unpack_fields(payload):
    pairs = (item.decode('utf-8', 'surrogateescape').partition('=')
             for item in payload.split(b'\0') if item)
    return dict((k, v) for k, _, v in pairs)


def split_frames(buf):
    """Complete frames at the start of buf -> ([(kind, payload)], rest)."""
    frames = []
    while len(buf) >= FRAME.size:
        kind, size = FRAME.unpack_from(buf)
        if size > FRAME_MAX:
            raise ValueError('frame too large')
        if len(buf) < FRAME.size + size:
            break
        frames.append((kind, bytes(buf[FRAME.size:FRAME.size + size])))
        buf = buf[FRAME.size + size:]
    return frames, buf


def exit_status(wait_status):
    """A process's exit code, or 128+signal when a signal ended it."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


# =============================================================================
# Reaper
# =============================================================================
# PID 1 inherits every orphan of the container: if it did not wait for them, each would
# stay a zombie until the container stops.

def wake_pipe():
    """A pipe that signal handlers write a byte to, so a select() sees every SIGCHLD
    (the handler itself does nothing) -> (read end, write end)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    _signal.signal(_signal.SIGCHLD, lambda s, f: None)
    _signal.set_wakeup_fd(wake_w)
    return wake_r, wake_w


def drain(wake_r):
    """Empty the wake-up pipe: its bytes only woke select()."""
    try:
        os.read(wake_r, 4096)
    except BlockingIOError:
        pass


def reap_children():
    """Collect every exited child without blocking: {pid: exit status}."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = exit_status(status)


def has_children():
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def stop_main(pid, sig, grace, wake_r):
    """An image's StopSignal (as Docker: to the main process only), then up to `grace`
    seconds for it to end -> the seconds left of the grace period."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return grace
    deadline = time.time() + grace
    while time.time() < deadline:
        if pid in reap_children():
            break
        wait_for_a_signal(wake_r, deadline)
    return max(0, deadline - time.time())


def stop_all(grace, wake_r):
    """SIGTERM every process of the container, reap for `grace` seconds, SIGKILL the rest."""
    for sig, wait in ((_signal.SIGTERM, grace), (_signal.SIGKILL, 5)):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            reap_children()
            if not has_children():
                return
            wait_for_a_signal(wake_r, deadline)


def wait_for_a_signal(wake_r, deadline):
    """Until a signal (each SIGCHLD writes to the wake-up pipe, even one that came before
    this call: none is missed) or the deadline; a stop is not polled."""
    try:
        if select.select([wake_r], [], [], max(0.0, deadline - time.time()))[0]:
            drain(wake_r)
    except InterruptedError:
        pass


# =============================================================================
# Sessions
# =============================================================================
# Each accepted connection is served by a process of its own, so a slow or silent client
# never blocks PID 1.  attach: a login shell on a new pty; run: a command on three pipes.

def find_shell():
    for path in SHELLS:
        if os.access(path, os.X_OK):
            return path
    return None


def session_env(request, hostname, shell):
    env = {'PATH': SESSION_PATH, 'HOME': '/root', 'USER': 'root', 'LOGNAME': 'root',
           'SHELL': shell, 'HOSTNAME': hostname, 'container': 'cocker',
           'TERM': request.get('term') or 'xterm'}
    for key in ('LANG', 'LC_ALL'):
        if request.get(key):
            env[key] = request[key]
    return env


def default_signals():
    """Every signal default and none blocked: what PID 1 starts from, and its commands."""
    for sig in range(1, _signal.NSIG):
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def reset_oom_score(value='0'):
    """PID 1 is shielded from the OOM killer (cocker sets that); its children are not."""
    try:
        with open('/proc/self/oom_score_adj', 'w') as f:
            f.write(value)
    except OSError:
        pass


def oom_score():
    try:
        with open('/proc/self/oom_score_adj') as f:
            return f.read().strip()
    except OSError:
        return None


def exec_child(argv, env, stdio, ctty=None, cwd=None, creds=None, make_cwd=True):
    """In a forked child: new session, stdio, clean descriptors, the user (uid, gid,
    groups) and directory asked for, exec; never returns."""
    try:
        os.setsid()
        if ctty is not None:
            fcntl.ioctl(ctty, termios.TIOCSCTTY, 0)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        default_signals()               # nothing of the host's process state
        reset_oom_score()
        os.umask(0o022)
        if cwd is not None and make_cwd and not os.path.isdir(cwd):
            os.makedirs(cwd, 0o755)             # as Docker makes a missing WorkingDir
        if creds is not None:                   # a user other than root keeps no capability
            os.setgroups(creds[2])
            os.setgid(creds[1])
            os.setuid(creds[0])
        try:
            os.chdir(cwd or ('/root' if os.path.isdir('/root') else '/'))
        except OSError as e:
            os.write(2, ('cockerinit: cannot change to %s: %s\n' % (cwd, e.strerror)).encode(
                'utf-8', 'replace'))
            os._exit(127)
        if NO_NEW_PRIVS:            # last: no setuid or file capability raises the command
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.execve(argv[0], [a.encode('utf-8', 'surrogateescape') for a in argv],
                  dict((k.encode(), v.encode('utf-8', 'surrogateescape')) for k, v in env.items()))
    except OSError as e:
        os.write(2, ('cockerinit: cannot run %s: %s\n' % (argv[0], e.strerror)).encode())
    except BaseException as e:          # a fork child's boundary: never back into PID 1
        os.write(2, ('cockerinit: cannot run %s: %s\n' % (argv[0], e)).encode())
    os._exit(127)


def spawn_child(argv, env, stdio, cwd, make_cwd):
    """exec_child's work for a root command on pipes, without a copy of this process (a
    fork copies its page tables, then every page it writes: 2 ms of a run): the session's
    process, which only relays from now on, takes on what the command inherits (umask,
    directory, no_new_privs, no descriptor but stdio; the OOM score for the time of the
    spawn), and posix_spawn's vfork starts it in a new session, every signal default but
    glibc's own two (32 and 33: its spawn leaves them ignored, as in every program it
    spawns) -> its pid, or None where this cannot be done (the fork then does it)."""
    shield = None
    try:
        os.umask(0o022)
        if cwd is not None and make_cwd and not os.path.isdir(cwd):
            os.makedirs(cwd, 0o755)
        os.chdir(cwd or ('/root' if os.path.isdir('/root') else '/'))
        if NO_NEW_PRIVS:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        for fd in os.listdir('/proc/self/fd'):
            if int(fd) > 2:
                try:
                    os.set_inheritable(int(fd), False)
                except OSError:
                    pass                # (the listing's own descriptor, closed)
        shield = oom_score()
        reset_oom_score()
        return os.posix_spawn(
            argv[0].encode('utf-8', 'surrogateescape'),
            [a.encode('utf-8', 'surrogateescape') for a in argv],
            dict((k.encode(), v.encode('utf-8', 'surrogateescape')) for k, v in env.items()),
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)],
            setsid=True, setsigmask=(), setsigdef=_signal.valid_signals())
    except (OSError, ValueError, NotImplementedError) as e:
        log('session: no spawn (%s), a fork instead' % e)
        os.chdir('/')                   # (PID 1's, where exec_child starts from)
        return None
    finally:
        if shield is not None:
            reset_oom_score(shield)     # the relay keeps PID 1's shield


def read_request(conn):
    """The first frame of a connection, within REQUEST_TIMEOUT: an R frame whose payload
    is the request's fields -> (fields, what came after it, still to relay)."""
    conn.settimeout(REQUEST_TIMEOUT)
    buf = b''
    while True:
        frames, rest = split_frames(buf)
        if frames:
            kind, payload = frames[0]
            if kind != b'R':
                raise ValueError('expected a request frame')
            conn.settimeout(None)
            # input frames that came with the request stay queued for the relay
            queued = b''.join(frame(k, p) for k, p in frames[1:])
            return unpack_fields(payload), queued + rest
        data = conn.recv(BUFSIZE)
        if not data:
            raise ValueError('client closed before its request')
        buf += data


def serve_session(conn, hostname):
    """One attach or run session, in its own process: never returns."""
    status = 1
    try:
        creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize('3i'))
        if struct.unpack('3i', creds)[1] != 0:
            raise ValueError('only root may open a session')
        request, rest = read_request(conn)
        shell = find_shell()
        if shell is None:
            send_frame(conn, b'M', b'no shell in the container (/bin/bash or /bin/sh)')
            os._exit(1)
        cmd = request.get('cmd')
        # run: the user asked for, else the image's, in its WorkingDir; attach: root's login
        user = request.get('user') or (IMAGE['user'] if cmd is not None else None)
        creds = resolve_user(user) if user else None
        env = session_env(request, hostname, shell)
        if creds is not None:
            env.update(HOME=creds[3], USER=user.partition(':')[0],
                       LOGNAME=user.partition(':')[0])
        if IMAGE.get('set'):
            image_env(env)
        for item in (request.get('env') or '').split('\n') if cmd is not None else ():
            key, sep, value = item.partition('=')
            if sep and key:
                env[key] = value            # run --env, over the image's
        # run -w names a directory that must be there (as docker exec -w); the image's
        # WorkingDir is made when missing (as docker run does)
        request['make_cwd'] = not request.get('cwd')
        request['cwd'] = (request.get('cwd') or IMAGE['cwd']) if cmd is not None else None
        request['creds'] = creds
        argv = [shell, '-l'] if cmd is None else [shell, '-c', cmd]
        log('session %s: %s' % ('tty' if request.get('tty') else 'pipes', ' '.join(argv)))
        status = relay(conn, request, argv, env, rest)
    except (OSError, ValueError) as e:
        log('session ended: %s' % e, 'WARN')
        try:
            send_frame(conn, b'M', str(e).encode('utf-8', 'replace'))
        except OSError:
            pass
    os._exit(status)


def start_command(request, argv, env):
    """Fork the session's command -> (pid, {fd: frame kind}, input fd or None, pty master)."""
    if request.get('tty'):
        master, slave = os.openpty()
        size = struct.pack('HHHH', *(int(request.get(k) or d) for k, d in
                                     (('rows', 24), ('cols', 80), ('xpix', 0), ('ypix', 0))))
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        pid = os.fork()
        if pid == 0:
            exec_child(argv, env, (slave, slave, slave), ctty=slave, cwd=request.get('cwd'),
                       creds=request.get('creds'), make_cwd=request.get('make_cwd'))
        os.close(slave)
        return pid, {master: b'O'}, master, master
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    if request.get('stdin'):
        in_r, in_w = os.pipe()
    else:
        in_r, in_w = os.open('/dev/null', os.O_RDONLY), None
    pid = None
    if request.get('creds') is None and hasattr(os, 'posix_spawn') and sys.version_info >= (3, 8):
        pid = spawn_child(argv, env, (in_r, out_w, err_w), request.get('cwd'),
                          request.get('make_cwd'))
    if pid is None:
        pid = os.fork()
        if pid == 0:
            exec_child(argv, env, (in_r, out_w, err_w), cwd=request.get('cwd'),
                       creds=request.get('creds'), make_cwd=request.get('make_cwd'))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    return pid, {out_r: b'O', err_r: b'E'}, in_w, None


def relay(conn, request, argv, env, buf):
    """Copy between the client and the command until it exits; send its exit status."""
    wake_r = wake_pipe()[0]
    pid, outputs, input_fd, master = start_command(request, argv, env)
    status = None
    try:
        status = Relay(conn, pid, outputs, input_fd, master, buf, wake_r).copy_until_exit()
    finally:
        if status is None:          # the client went away or failed: hang up the command
            try:
                os.killpg(pid, _signal.SIGHUP)
            except ProcessLookupError:
                pass
    if status is None:
        return 1
    send_frame(conn, b'X', pack_fields({'status': status}))
    return 0


class Relay(object):
    """One session's copy: client frames to the command's input and window, the command's
    outputs to client frames, until it has exited and its outputs are quiet."""

    def __init__(self, conn, pid, outputs, input_fd, master, buf, wake_r):
        self.conn, self.pid, self.wake_r = conn, pid, wake_r
        self.outputs = outputs          # {fd: frame kind} still open
        self.input_fd = input_fd        # the command's input (the pty master with a tty)
        self.master = master            # the pty master, or None on pipes
        self.buf = buf                  # client bytes not yet split into frames
        self.pending = bytearray()      # client input not yet taken by the command
        self.close_input = False        # the client closed its input (a C frame)
        self.status = None              # the command's exit status once it has exited

    def copy_until_exit(self):
        """The command's exit status, or None when the client went away."""
        if self.input_fd is not None:
            os.set_blocking(self.input_fd, False)
        while True:
            self.take_frames()
            if self.status is not None and not self.outputs:
                return self.status
            try:
                readable, writable, _ = select.select(self.readers(), self.writers(), [],
                                                      self.timeout())
            except InterruptedError:
                continue
            if self.status is not None and not readable:
                return self.status                  # exited and quiet: done
            for fd in [fd for fd in self.outputs if fd in readable]:
                self.read_output(fd)
            if writable:
                self.write_input()
            if self.conn in readable and not self.read_client():
                return None                         # the client went away
            if self.wake_r in readable:
                drain(self.wake_r)
            if self.status is None:
                self.check_exit()

    def readers(self):
        # stop reading the client while the command has not taken its input yet
        client = [self.conn] if len(self.pending) < INPUT_LIMIT else []
        return client + [self.wake_r] + list(self.outputs)

    def writers(self):
        return [self.input_fd] if self.pending and self.input_fd is not None else []

    def timeout(self):
        """None while the command runs; once it exited, wait this long for more output."""
        return EXIT_LINGER if self.status is not None else None

    def take_frames(self):
        """Act on the client's complete frames; close the input once it has all of it."""
        frames, self.buf = split_frames(self.buf)
        for kind, payload in frames:
            if kind == b'I':
                self.pending.extend(payload)
            elif kind == b'C':
                self.close_input = True
            elif kind == b'W' and self.master is not None:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                            struct.pack('HHHH', *struct.unpack('>HHHH', payload)))
        # a pty's input is its master, which is also its output: never closed here
        if self.close_input and not self.pending and self.input_fd is not None and \
                self.master is None:
            os.close(self.input_fd)
            self.input_fd = None

    def read_output(self, fd):
        """Send what the command wrote on fd; at its end, stop reading it."""
        try:
            data = os.read(fd, BUFSIZE)
        except BlockingIOError:
            return
        except OSError:                             # EIO: the pty's last user is gone
            data = b''
        if data:
            send_frame(self.conn, self.outputs[fd], data)
            return
        del self.outputs[fd]
        if fd != self.master:                       # the master is the input too
            os.close(fd)

    def write_input(self):
        try:
            del self.pending[:os.write(self.input_fd, self.pending)]
        except BlockingIOError:
            pass
        except OSError:                             # the command closed its input
            del self.pending[:]

    def read_client(self):
        """Take what the client sent -> False when it went away."""
        data = self.conn.recv(BUFSIZE)
        if not data:
            return False
        self.buf += data
        return True

    def check_exit(self):
        try:
            done, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done, wait_status = self.pid, 0
        if done:
            self.status = exit_status(wait_status)


# =============================================================================
# Setup
# =============================================================================

def bind_control_socket(sockdir):
    """Listen on SOCKDIR/cocker.sock (a host path: the container never sees it)."""
    dfd = os.open(sockdir, os.O_PATH | os.O_DIRECTORY)
    path = '/proc/self/fd/%d/%s' % (dfd, SOCKET_NAME)   # short, whatever COCKER_HOME is
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    os.close(dfd)
    listener.listen(128)
    return listener


def shut_off_imports():
    """No module can be loaded from here on (one found in a container would run with us);
    those already loaded still are.  Builtin and frozen ones come from no file."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if getattr(f, '__name__', None) in ('BuiltinImporter', 'FrozenImporter')]
    sys.path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()


def enter_root(root):
    """pivot_root into the container root and detach the host's tree (not chroot)."""
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    # removes exactly the old root, without needing a directory for it in the image
    pivot_root('.', '.')
    umount2('.', MNT_DETACH)
    os.chdir('/')


def start_main_command(argv, env, cwd=None, creds=None):
    """The container's main process (-e, or an imported image's command), output to the
    container log; or, for a one-shot run, on the pipes or the terminal cocker passed."""
    argv = [find_program(argv[0], env.get('PATH', SESSION_PATH), cwd or '/root')] + argv[1:]
    stdio = list(MAIN_STDIO) or [os.open('/dev/null', os.O_RDONLY), 1, 2]
    tty = stdio[0] if MAIN_STDIO and TTY else None
    if tty is not None:
        env.setdefault('TERM', 'xterm')
    pid = os.fork()
    if pid == 0:
        exec_child(argv, env, stdio, ctty=tty, cwd=cwd, creds=creds)
    for fd in set(stdio) - {1, 2}:
        os.close(fd)                        # the command holds them: its end is their end
    log('main command %d: %s' % (pid, ' '.join(argv)))
    return pid


def find_program(prog, path, cwd):
    if '/' not in prog:
        for d in path.split(':'):
            if d and os.access(os.path.join(d, prog), os.X_OK):
                return os.path.join(d, prog)
        return prog
    return prog if prog.startswith('/') else os.path.join(cwd, prog)


def read_image_settings(sockdir):
    """cp/main, written by cocker on the host for a container of an imported image."""
    with open(os.path.join(sockdir, 'main'), 'rb') as f:
        data = f.read(USER_FILE_MAX)
    settings = {'arg': [], 'env': [], 'cwd': None, 'user': None, 'stop': None}
    for item in data.split(b'\0'):
        key, _, value = item.decode('utf-8', 'surrogateescape').partition('=')
        if key in ('arg', 'env'):
            settings[key].append(value)
        elif key in ('cwd', 'user'):
            settings[key] = value or None
        elif key == 'stop' and value.isdigit():
            settings['stop'] = int(value)
    return settings


def image_env(env):
    """The environment Docker users know: the defaults in env (PATH, HOSTNAME, HOME, a
    session's TERM), the image's Env over them."""
    for item in IMAGE['env']:
        key, sep, value = item.partition('=')
        if sep and key:
            env[key] = value
    return env


def start_image_command(config, hostname):
    """The main process: an imported image's (Entrypoint, Cmd or -e; its Env, WorkingDir
    and User), else -e's command as root; None when there is none."""
    if IMAGE['arg']:
        creds = resolve_user(IMAGE['user'])
        env = image_env({'PATH': SESSION_PATH, 'HOSTNAME': hostname, 'HOME': creds[3],
                         'container': 'cocker'})
        return start_main_command(IMAGE['arg'], env, IMAGE['cwd'],
                                  creds if IMAGE['user'] else None)
    if config['COCKER_EXEC']:
        return start_main_command(config['exec_argv'],
                                  {'PATH': SESSION_PATH, 'HOME': '/root', 'container': 'cocker'})
    return None


def resolve_user(text):
    """'name', 'uid', 'name:group' or 'uid:gid' -> (uid, gid, groups, home), from the
    container's own /etc/passwd and /etc/group, read as plain text (never through NSS,
    which would load the container's modules).  None or '' is root."""
    if not text:
        return 0, 0, [], '/root'
    user, _, group = text.partition(':')
    entry = next((e for e in user_entries('/etc/passwd', 7)
                  if (e[2] if user.isdigit() else e[0]) == user), None)
    if entry is None and not user.isdigit():
        raise ValueError("user '%s' is not in the container's /etc/passwd" % user)
    uid = int(entry[2]) if entry else int(user)
    gid = int(entry[3]) if entry else 0
    name = entry[0] if entry else None
    groups = [int(e[2]) for e in user_entries('/etc/group', 4)
              if name and name in e[3].split(',') and e[2].isdigit()]
    if group:
        found = next((e for e in user_entries('/etc/group', 4)
                      if (e[2] if group.isdigit() else e[0]) == group), None)
        if found is None and not group.isdigit():
            raise ValueError("group '%s' is not in the container's /etc/group" % group)
        gid = int(found[2]) if found else int(group)
    if not all(0 <= n < ID_LIMIT for n in [uid, gid] + groups):
        raise ValueError("user '%s' has an id out of range" % text)
    return uid, gid, sorted(set(groups + [gid])), entry[5] if entry else '/'


def user_entries(path, fields):
    """The colon-separated lines of a passwd or group file with enough fields (a file
    that is missing, not regular or too large reads as empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = f.read(USER_FILE_MAX)
    lines = data.decode('utf-8', 'replace').splitlines()
    return [e for e in (line.split(':') for line in lines)
            if len(e) >= fields and e[0] and (fields < 7 or e[2].isdigit() and e[3].isdigit())]


# =============================================================================
# main
# =============================================================================
# main() checks how it was started, sets up (everything that can fail, reported on the
# ready channel), waits for GO, reports READY and serves: one event at a time until the
# container stops.

def show_as(argv, env, comm=b'cockerinit'):
    """What /proc/self/cmdline and environ show (ps, pgrep, a look from the host): this
    program's own command line and settings, not those of the cocker command PID 1 was
    forked from.  Written over the old ones in place, as setproctitle does, padded with NUL
    bytes; the words that do not fit are left out.  Best effort.  Its name (comm, what
    pgrep and top show) becomes comm."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))
    try:
        with open('/proc/self/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        arg_start, arg_end, env_start, env_end = (int(n) for n in fields[45:49])
        with open('/proc/self/mem', 'r+b', buffering=0) as mem:
            for words, start, end in ((argv, arg_start, arg_end), (env, env_start, env_end)):
                data = b''
                for word in words:
                    word = word.encode('utf-8', 'surrogateescape') + b'\0'
                    if len(data) + len(word) <= end - start:
                        data += word
                mem.seek(start)
                mem.write(data.ljust(end - start, b'\0'))
    except (OSError, ValueError):
        pass


def refuse_to_run(argv):
    """The exit status when this is not a container's PID 1 started by cocker, else None."""
    if '-v' in argv:
        print('cockerinit v%s' % VERSION)
        return 0
    if len(argv) != 2 or argv[0] != '--container':
        sys.stderr.write("*** ERROR : '--container' need for running\n")
        return 249
    if os.getpid() != 1 or 'COCKER_ROOT' not in os.environ:
        sys.stderr.write('*** ERROR : please run me by cocker\n')
        return 1
    return None


def split_command(text):
    """text -> its words, as shlex.split(text) gives them (POSIX quoting, no comments) and
    with its errors (ValueError), without loading shlex: it imports re and enum, 14 ms of a
    boot or of a one-shot run."""
    words, word, i = [], None, 0
    while i < len(text):
        c = text[i]
        if c in ' \t\r\n':
            if word is not None:
                words.append(word)
            word = None
        elif c == '\\':
            if i + 1 == len(text):
                raise ValueError('No escaped character')
            i += 1
            word = (word or '') + text[i]
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError('No closing quotation')
            word, i = (word or '') + text[i + 1:end], end
        elif c == '"':
            i, quoted = unquote_double(text, i + 1)
            word = (word or '') + quoted
        else:
            word = (word or '') + c
        i += 1
    return words if word is None else words + [word]


def unquote_double(text, i):
    """The double-quoted string from text[i] on -> (index of its closing quote, its text);
    in it a backslash escapes only a backslash or a double quote, as in shlex."""
    chars = []
    while i < len(text) and text[i] != '"':
        if text[i] == '\\':
            if i + 1 == len(text):
                raise ValueError('No escaped character')
            if text[i + 1] in '\\"':
                i += 1
        chars.append(text[i])
        i += 1
    if i == len(text):
        raise ValueError('No closing quotation')
    return i, ''.join(chars)


def take_config(config):
    """The descriptors cocker handed over, kept from every command -> (ready, alive,
    console)."""
    ready, alive, console, log_fd = (int(config['COCKER_%s_FD' % k])
                                     for k in ('READY', 'ALIVE', 'CONSOLE', 'LOG'))
    for fd in (ready, alive, console, log_fd):
        os.set_inheritable(fd, False)
    if config['COCKER_EXEC']:
        config['exec_argv'] = split_command(config['COCKER_EXEC'])
    for key in ('COCKER_CGROUPS_FD', 'COCKER_SERVED_FD'):   # (not SOCKDIR's: O_PATH, opened
        # close-on-exec; Python 3.6's set_inheritable fails on it, by ioctl)
        if config[key]:
            os.set_inheritable(int(config[key]), False)
    if config['COCKER_STDIN_FD']:           # a one-shot run: the main process's stdio
        MAIN_STDIO.extend(int(config['COCKER_%s_FD' % k]) for k in ('STDIN', 'STDOUT', 'STDERR'))
        for fd in MAIN_STDIO:
            os.set_inheritable(fd, False)
    return ready, alive, console


def set_up(config):
    """Socket, root, confinement, stdin, console -> (listener, console slave)."""
    with open('/proc/sys/kernel/cap_last_cap') as f:
        last_cap = int(f.read())
    time.localtime()                             # load the time zone while the host's is here
    shut_off_imports()
    sockdir_fd = config['COCKER_SOCKDIR_FD']
    sockdir = '/proc/self/fd/' + sockdir_fd if sockdir_fd else config['COCKER_SOCKDIR']
    listener = bind_control_socket(sockdir)
    if config['COCKER_MAIN'] == '1':            # a host file of cocker's, read before we leave
        IMAGE.update(read_image_settings(sockdir))
        IMAGE['set'] = True
    if sockdir_fd:
        os.close(int(sockdir_fd))               # (a way out of the root: never the container's)
    enter_root(config['COCKER_ROOT'])
    confine(last_cap, seccomp=config['COCKER_SECCOMP'] != 'unconfined')
    prctl(PR_SET_DUMPABLE, 0)                   # again: credentials changed
    global NO_NEW_PRIVS, TTY
    NO_NEW_PRIVS = config['COCKER_NO_NEW_PRIVS'] == '1'
    TTY = config['COCKER_TTY'] == '1'
    # stdin came from the host (/dev/null of the monitor): use the container's own
    null = os.open('/dev/null', os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    # PID 1 holds the console's own end (raw: the log gets the bytes as written), so its
    # master is never hung up while no process of the container has /dev/console open
    console_slave = os.open('/dev/console', os.O_RDWR | os.O_NOCTTY)
    tty.setraw(console_slave)
    return listener, console_slave


def main(argv):
    """cockerinit run as a program: -v, or --container NAME with cocker's settings in the
    environment (cocker itself calls serve_container() in the process it forked)."""
    refused = refuse_to_run(argv)
    if refused is not None:
        return refused
    return serve_container(argv[1], dict((key, os.environ.pop(key, None))
                                         for key in CONFIG_ENV))


def wait_for_cgroups(fd):
    """Where PID 1 was not born in its cgroups (no clone3), cocker's monitor moves it there
    while it sets up (the move waits for an RCU grace period, up to 20 ms); nothing of the
    container runs before it says, with one byte on this pipe, that the move is done."""
    if fd:
        done = os.read(int(fd), 1)
        os.close(int(fd))
        if done != b'1':
            raise ValueError("not moved into the container's cgroups (see cocker.log)")


def wait_for_go(ready):
    """cocker finishes the host side (a BRIDGE container's eth0) while PID 1 sets up;
    nothing of the container runs before it says GO on the ready channel."""
    if os.read(ready, 1) != GO:
        raise ValueError('the boot was abandoned by cocker (see cocker.log)')


def tell_cocker(ready, data):
    """On the ready channel, if the cocker that booted PID 1 still listens (one that
    abandoned the boot, or went away after GO, does not)."""
    try:
        os.write(ready, data)
    except OSError:
        pass


def tell_monitor_served(fd):
    """One byte on COCKER_SERVED_FD: this PID 1 became READY, so its end may be followed
    by a restart (a boot that never did has failed, or was abandoned)."""
    if fd:
        os.write(int(fd), b'1')
        os.close(int(fd))


def serve_container(name, config):
    """PID 1's life from cocker's settings (CONFIG_ENV's names, text values): set up,
    GO, READY, serve until the container stops -> the exit status."""
    prctl(PR_SET_DUMPABLE, 0)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)    # (as Python starts a program)
    ready, alive, console = take_config(config)
    try:
        listener, console_slave = set_up(config)
        wait_for_go(ready)
        wait_for_cgroups(config['COCKER_CGROUPS_FD'])
        pid1 = Pid1(listener, alive, console, console_slave, config['COCKER_HOSTNAME'] or '')
        pid1.main_pid = start_image_command(config, config['COCKER_HOSTNAME'] or '')
    except (OSError, ValueError) as e:
        tell_cocker(ready, ('cockerinit: %s' % (getattr(e, 'strerror', None) or e)).encode(
            'utf-8', 'replace'))
        return 1
    tell_monitor_served(config['COCKER_SERVED_FD'])     # (the main command runs already)
    tell_cocker(ready, READY)
    os.close(ready)
    log('--- cockerinit ready: container %s ---' % name)
    return pid1.serve()


class Pid1(object):
    """What PID 1 serves: the control socket, the console, the monitor's alive pipe and the
    signals; serve() handles one event per method."""

    def __init__(self, listener, alive, console, console_slave, hostname):
        self.listener, self.alive, self.hostname = listener, alive, hostname
        self.console, self.console_slave = console, console_slave
        self.main_pid = None                # the -e command, which stops the container
        self.stopping = []                  # the stop signals received
        for sig in STOP_SIGNALS:
            _signal.signal(sig, lambda s, f: self.stopping.append(s))
        self.wake_r, self.wake_w = wake_pipe()
        self.readers = [listener, alive, self.wake_r, console]

    def leave_to_session(self):
        """In a session's process: nothing of PID 1 stays but the connection."""
        for sig in STOP_SIGNALS:
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.set_wakeup_fd(-1)
        self.listener.close()
        for fd in (self.alive, self.wake_r, self.wake_w, self.console, self.console_slave):
            os.close(fd)

    def serve(self):
        """Until the container stops -> PID 1's exit status."""
        while True:
            try:
                readable = select.select(self.readers, [], [])[0]
            except InterruptedError:
                continue
            if self.wake_r in readable:
                drain(self.wake_r)
            stop = self.why_stop(readable)
            if stop is not None:
                text, level, grace, status = stop
                log(text, level)
                if self.stopping and self.main_pid and IMAGE['stop']:
                    grace = stop_main(self.main_pid, IMAGE['stop'], grace, self.wake_r)
                stop_all(grace, self.wake_r)
                return status
            if self.console in readable:
                self.copy_console()
            if self.listener in readable:
                self.accept_session()

    def why_stop(self, readable):
        """(log line, level, grace, exit status) when the container must stop, else None;
        reaps every exited child on the way."""
        done = reap_children()
        if self.main_pid in done:
            status, self.main_pid = done[self.main_pid], None
            return ('main command exited with status %d, stopping the container'
                    % status, 'INFO', STOP_GRACE, status)
        if self.stopping:
            return ('signal %d: stopping the container' % self.stopping[0], 'INFO',
                    STOP_GRACE, 0)
        if self.alive in readable:
            return 'the monitor is gone: stopping the container', 'WARN', 0, 1
        return None

    def copy_console(self):
        """What the container shows on /dev/console goes to its log."""
        try:
            os.write(2, os.read(self.console, BUFSIZE))
        except OSError:
            self.readers.remove(self.console)

    def accept_session(self):
        """One new connection, served by a process of its own."""
        try:
            conn = accept(self.listener)
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError as e:            # e.g. the pids limit: refuse this session only
            refuse_session(conn, e)
            return
        if pid == 0:
            self.leave_to_session()
            serve_session(conn, self.hostname)
        conn.close()


def accept(listener):
    """A new connection, blocking (_socket's accept gives its descriptor)."""
    fd, _ = listener._accept()
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)


def refuse_session(conn, error):
    """No process for this session (fork failed): say why to its client only."""
    log('cannot start a session: %s' % error, 'WARN')
    try:
        send_frame(conn, b'M', ('cannot start a session: %s' % error.strerror).encode())
    except OSError:
        pass
    conn.close()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
