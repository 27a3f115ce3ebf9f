"""Attacks on a default container, each test named after the attack it tries.

A pass means the attack failed and the normal use still works.  Everything runs against
real containers on the real kernel: a host loop device, the host's keyring, a planted NSS
module, FIFOs, a fork bomb, a neighbour host routed through this one.  The container gets
a static probe (tests/probe.c, built here: one system call or open or mknod, its errno on
stdout, in the manner of bubblewrap's try-syscall) and a static busybox, read-only at /t.
Where a layer of defence could hide another (nodev and the device cgroup, the seccomp
filter and the missing capabilities), each is shown on its own.
"""

import ctypes
import errno
import gzip
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import uuid

import pytest

from conftest import (COCKER, COCKERINIT, PYTHON, cocker_process, container_path, load_script,
                      wait_for)
from test_e2e_network import (bridge_plan, busybox, fetch, free_port, outside,  # noqa: F401
                              server, vip_of)

init = load_script('cockerinit_attacks', COCKERINIT)
cocker_module = load_script('cocker_attacks', COCKER)

HERE = os.path.dirname(os.path.abspath(__file__))
PODMAN_CAPS = '00000000800405fb'
MACHINE = os.uname().machine


@pytest.fixture(scope='session')
def tools(home):
    """A directory with the static probe and busybox, for a read-only volume at /t."""
    directory = os.path.join(home, 'attack-tools')
    os.makedirs(directory, exist_ok=True)
    gcc = shutil.which('gcc')
    if gcc is None or shutil.which('busybox') is None:
        pytest.fail('gcc, libc6-dev and busybox-static are needed: tests/run.sh installs them')
    subprocess.check_call([gcc, '-static', '-O2', '-o', os.path.join(directory, 'probe'),
                           os.path.join(HERE, 'probe.c')])
    shutil.copy(shutil.which('busybox'), os.path.join(directory, 'busybox'))
    return directory


@pytest.fixture
def attacked(cocker, test_image, names, tools):
    """attacked(*create_options) -> a booted container with the tools at /t."""
    def make(*options):
        name = names('atk')
        r = cocker('-a', 'create', '-m', test_image, '-c', name, '--volume', tools + ':/t:ro',
                   *options)
        assert r.rc == 0, r
        r = cocker('-a', 'boot', '-c', name)
        assert r.rc == 0 and r.out == 'OK\n', r
        return name
    return make


def inside(cocker, name, command):
    return cocker('-a', 'run', '-c', name, '--cmd', command)


def probe(cocker, name, *args):
    """(result, errno) of the probe run in the container."""
    r = inside(cocker, name, '/t/probe ' + ' '.join(str(a) for a in args))
    assert r.rc == 0 and len(r.out.split()) >= 2, r
    result, error = r.out.split()[:2]
    return int(result), int(error)


def init_pid(home, name):
    return int(open(container_path(home, name, 'init_pid')).read())


def container_cgroups(home, name):
    return open(container_path(home, name, 'cgroups')).read().split()


# ---- capabilities ----------------------------------------------------------------------

def test_no_process_of_the_container_holds_more_than_podmans_capabilities(
        attacked, cocker, terminal):
    name = attacked()
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    r = cocker('-a', 'boot', '-c', name, '-e', 'sleep 600')       # a main process too
    assert r.rc == 0, r
    r = inside(cocker, name, 'grep -H -E "^Cap" /proc/[0-9]*/status')
    sets = {}
    for line in r.out.splitlines():
        path, key, value = re.match(r'(/proc/\d+)/status:(\w+):\s+(\w+)', line).groups()
        sets.setdefault(path, {})[key] = value
    assert len(sets) >= 3, 'PID 1, the main process and this session: %r' % r
    for path, caps in sets.items():
        assert caps == {'CapInh': '0' * 16, 'CapPrm': PODMAN_CAPS, 'CapEff': PODMAN_CAPS,
                        'CapBnd': PODMAN_CAPS, 'CapAmb': '0' * 16}, (path, caps)
    t = terminal('-a', 'attach', '-c', name)
    t.expect('[root@%s /root] ' % name)
    t.send('grep -E "CapEff|CapBnd" /proc/self/status; exit\r')
    out = t.expect('logout')
    assert t.wait() == 0
    assert out.count(PODMAN_CAPS) >= 2, out


# ---- devices ---------------------------------------------------------------------------

@pytest.fixture
def host_disk(tmp_path):
    """A loop device of this host with known contents: (path, major, minor)."""
    backing = tmp_path / 'disk.img'
    backing.write_bytes(b'HOSTDISK' * 8192)
    device = subprocess.check_output(['losetup', '-f', '--show', str(backing)]).decode().strip()
    try:
        rdev = os.stat(device).st_rdev
        yield device, os.major(rdev), os.minor(rdev)
    finally:
        subprocess.check_call(['losetup', '-d', device])


def test_the_hosts_disk_cannot_be_read_or_written_from_inside(attacked, cocker, home,
                                                              host_disk, tmp_path):
    device, major, minor = host_disk
    volume = tmp_path / 'vol'
    volume.mkdir()
    os.mknod(str(volume / 'disk'), stat.S_IFBLK | 0o600, os.makedev(major, minor))
    with open(str(volume / 'disk'), 'rb') as f:
        assert f.read(8) == b'HOSTDISK', 'the node works on the host'
    name = attacked('--volume', '%s:/vol' % volume)
    # no CAP_MKNOD (and the device cgroup refuses mknod too)
    assert probe(cocker, name, 'mknod', '/tmp/disk', 'b', major, minor) == (-1, errno.EPERM)
    # a node brought in by a volume: the volume is nodev
    assert probe(cocker, name, 'open', '/vol/disk', 'r') == (-1, errno.EACCES)
    assert probe(cocker, name, 'open', '/vol/disk', 'w') == (-1, errno.EACCES)
    # a node in the container's /dev (the one tmpfs without nodev), put there by the host:
    # the device cgroup alone refuses it
    node = '/proc/%d/root/dev/disk' % init_pid(home, name)
    os.mknod(node, stat.S_IFBLK | 0o666, os.makedev(major, minor))
    with open(node, 'rb') as f:
        assert f.read(8) == b'HOSTDISK', 'the host opens that very node'
    assert probe(cocker, name, 'open', '/dev/disk', 'r') == (-1, errno.EPERM)
    assert probe(cocker, name, 'open', '/dev/disk', 'w') == (-1, errno.EPERM)
    # the container's own devices still work
    assert probe(cocker, name, 'open', '/dev/null', 'w') == (1, 0)
    assert probe(cocker, name, 'open', '/dev/urandom', 'r') == (1, 0)
    assert inside(cocker, name, 'echo ok > /dev/tty 2>/dev/null; ls /dev/pts/ptmx').rc == 0
    with open(device, 'rb') as f:
        assert f.read(8) == b'HOSTDISK', 'the disk is untouched'


def test_each_device_cgroup_method_alone_refuses_the_hosts_disk(attacked, cocker, home,
                                                                 host_disk, not_run):
    device = host_disk[0]
    name = attacked()
    r = cocker('-a', 'shutdown', '-c', name)
    r = cocker('-d', '-a', 'boot', '-c', name)
    assert r.rc == 0, r
    with open(os.path.join(home, 'cocker.log')) as f:     # (a step of the monitor's)
        methods = re.findall(r'\| devices of %s: (.*)' % name, f.read())[-1]
    dirs = container_cgroups(home, name)
    v1 = [d for d in dirs if os.path.exists(os.path.join(d, 'devices.list'))]
    v2 = [d for d in dirs if os.path.exists(os.path.join(d, 'cgroup.controllers'))]
    if os.path.isdir('/sys/fs/cgroup/devices'):
        assert v1 and 'cgroup v1 devices controller' in methods, (dirs, methods)
        assert set(open(os.path.join(v1[0], 'devices.list')).read().split('\n')) - {''} == set(
            cocker_module.device_rules())
    if cocker_module.cgroup_version() == 2 or cocker_module.cgroup_version(
            '/sys/fs/cgroup/unified') == 2:
        assert v2 and 'cgroup v2 device program' in methods, (dirs, methods)
    else:
        not_run('the cgroup v2 device program end to end (test_each_device_cgroup_method_'
                'alone_refuses_the_hosts_disk): no cgroup2 tree at /sys/fs/cgroup or '
                '/sys/fs/cgroup/unified on this host (cgroup v1 only); only the unit tests '
                'ran the program, on an interpreter')
    assert v1 or v2, 'this host can do neither: only nodev and CAP_MKNOD guard the devices'
    # a host process that joins one of the container's cgroups, and no other, is refused
    # the disk by that cgroup alone
    for directory in v1 + v2:
        join = 'echo $$ > %s/cgroup.procs && exec ' % directory
        denied = subprocess.run(['sh', '-c', join + 'dd if=%s of=/dev/null count=1' % device],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert denied.returncode != 0 and b'Operation not permitted' in denied.stderr, \
            (directory, denied)
        allowed = subprocess.run(['sh', '-c', join + 'head -c 4 /dev/zero'],
                                 stdout=subprocess.PIPE)
        assert allowed.stdout == b'\0' * 4, directory


# ---- seccomp ---------------------------------------------------------------------------

def kernel_syscall_numbers():
    """name -> number from the kernel's own headers (linux-libc-dev), not from cockerinit."""
    headers = {'x86_64': '/usr/include/x86_64-linux-gnu/asm/unistd_64.h',
               'aarch64': '/usr/include/asm-generic/unistd.h'}
    path = headers.get(MACHINE)
    if path is None or not os.path.exists(path):
        for candidate in ('/usr/include/asm/unistd_64.h',):
            if os.path.exists(candidate):
                path = candidate
    if path is None or not os.path.exists(path):
        pytest.fail('no kernel headers for %s (tests/run.sh installs libc6-dev)' % MACHINE)
    numbers = {}
    for m in re.finditer(r'#define __NR(?:3264)?_(\w+)\s+(\d+)', open(path).read()):
        numbers[m.group(1)] = int(m.group(2))
    return numbers


CLONE_NEWUSER, SIGCHLD = 0x10000000, 17


def test_seccomp_denies_the_kernel_surface_docker_denies(attacked, cocker):
    numbers = kernel_syscall_numbers()
    name = attacked()
    r = inside(cocker, name, 'grep Seccomp: /proc/1/status /proc/self/status')
    assert r.out.split() == ['/proc/1/status:Seccomp:', '2', '/proc/self/status:Seccomp:', '2']
    checked = [n for n in init.DENIED if n in numbers]
    assert len(checked) >= 35, checked
    for syscall in checked:
        assert probe(cocker, name, numbers[syscall]) == (-1, errno.EPERM), syscall
    assert probe(cocker, name, numbers['clone3'], 0, 0) == (-1, errno.ENOSYS)
    assert probe(cocker, name, numbers['unshare'], CLONE_NEWUSER) == (-1, errno.EPERM)
    assert probe(cocker, name, numbers['clone'], CLONE_NEWUSER | SIGCHLD) == (-1, errno.EPERM)
    assert probe(cocker, name, numbers['personality'], 0x0400000) == (-1, errno.EPERM)
    assert probe(cocker, name, numbers['personality'], 0xffffffff) == (0, 0)
    assert probe(cocker, name, numbers['socket'], 40, 1, 0) == (-1, errno.EPERM)   # AF_VSOCK
    assert probe(cocker, name, numbers['socket'], 1, 1, 0)[1] == 0                 # AF_UNIX
    assert probe(cocker, name, numbers['getpid'])[1] == 0, 'the rest works'
    if MACHINE == 'x86_64':
        # another ABI never reaches the calls under other numbers: x32, i386
        assert probe(cocker, name, 0x40000000 | numbers['getpid']) == (-1, errno.EPERM)
        assert probe(cocker, name, 'int80', 20) == (-1, errno.EPERM)
    r = inside(cocker, name, '/t/busybox unshare -U -r true')
    assert r.rc != 0 and 'Operation not permitted' in r.err, r
    # fork, threads (clone3 falls back to clone) and a pipeline work
    assert inside(cocker, name, 'ls / | wc -l; sh -c "sleep 0 & wait"').rc == 0


def test_seccomp_unconfined_and_no_new_privs_are_what_they_say(attacked, cocker):
    numbers = kernel_syscall_numbers()
    loose = attacked('--seccomp', 'unconfined')
    r = inside(cocker, loose, 'grep -E "Seccomp:|NoNewPrivs:" /proc/self/status')
    assert r.out.split() == ['NoNewPrivs:', '0', 'Seccomp:', '0'], r
    # the same calls are not refused without the filter: it is the filter that refuses them
    assert probe(cocker, loose, numbers['unshare'], CLONE_NEWUSER) == (0, 0)
    assert probe(cocker, loose, numbers['clone3'], 0, 0)[1] != errno.ENOSYS
    assert probe(cocker, loose, numbers['keyctl'], 0, 0xfffffffffffffffc, 0)[1] == 0
    assert cocker('-a', 'shutdown', '-c', loose).rc == 0
    assert cocker('-a', 'boot', '-c', loose, '--seccomp', 'default').rc == 0
    assert inside(cocker, loose, 'grep Seccomp: /proc/self/status').out.split()[1] == '2'
    strict = attacked('--no-new-privs')
    r = inside(cocker, strict, 'grep -E "Seccomp:|NoNewPrivs:" /proc/self/status')
    assert r.out.split() == ['NoNewPrivs:', '1', 'Seccomp:', '2'], r
    r = cocker('-a', 'create', '-m', 'test', '-c', loose + 'x', '--seccomp', 'off')
    assert r.rc == 7 and "'--seccomp' value[off] invalid" in r.err


def test_the_hosts_keyring_is_invisible(attacked, cocker):
    add_key, keyctl = {'x86_64': (248, 250), 'aarch64': (217, 219)}[MACHINE]
    libc = ctypes.CDLL(None, use_errno=True)
    description = 'cocker-test-%s' % uuid.uuid4().hex[:8]
    key = libc.syscall(add_key, b'user', description.encode(), b'host secret',
                       ctypes.c_size_t(11), ctypes.c_int(-4))        # root's user keyring
    assert key > 0, os.strerror(ctypes.get_errno())
    try:
        assert description in open('/proc/keys').read(), 'the host sees its key'
        name = attacked()
        r = inside(cocker, name, 'cat /proc/keys; echo end')
        assert r.out == 'end\n', r
        assert probe(cocker, name, keyctl, 6, key, 0, 0) == (-1, errno.EPERM)   # DESCRIBE
        assert probe(cocker, name, keyctl, 11, key, 0, 0) == (-1, errno.EPERM)  # READ
    finally:
        libc.syscall(keyctl, 21, ctypes.c_long(key))                         # INVALIDATE


# ---- /proc and /sys --------------------------------------------------------------------

def test_proc_is_masked_and_its_knobs_read_only(attacked, cocker):
    name = attacked()
    files = [f for f in cocker_module.PROC_MASKED_FILES if os.path.exists('/proc/' + f)]
    dirs = [d for d in cocker_module.PROC_MASKED_DIRS if os.path.isdir('/proc/' + d)]
    assert 'keys' in files and 'timer_list' in files, files
    for f in files:
        r = inside(cocker, name, 'stat -c "%%t:%%T %%F" /proc/%s; wc -c < /proc/%s; '
                   'echo x > /proc/%s; wc -c < /proc/%s' % (f, f, f, f))
        assert r.out.split('\n')[:3] == ['1:3 character special file', '0', '0'], (f, r)
    for d in dirs:
        r = inside(cocker, name, 'ls -A /proc/%s | wc -l; touch /proc/%s/x' % (d, d))
        assert r.out == '0\n' and 'Read-only file system' in r.err, (d, r)
    for path in files[:1] + dirs[:1]:
        r = inside(cocker, name, '/t/busybox umount /proc/%s' % path)
        assert r.rc != 0 and 'Operation not permitted' in r.err, r
        r = inside(cocker, name, '/t/busybox umount -l /proc/%s' % path)
        assert r.rc != 0 and 'Operation not permitted' in r.err, r
    for knob in [k for k in ('/proc/sysrq-trigger', '/proc/sys/kernel/core_pattern',
                             '/proc/sys/vm/drop_caches') if os.path.exists(k)]:
        r = inside(cocker, name, 'echo 1 > %s' % knob)
        assert r.rc != 0 and 'Read-only file system' in r.err, (knob, r)
    assert inside(cocker, name, 'cat /proc/uptime /proc/self/status >/dev/null').rc == 0


def test_a_masked_file_never_lets_the_container_change_the_hosts_dev_null(attacked, cocker,
                                                                         home):
    """The masks are binds of a 1:3 node (the host's /dev/null where PID 1 copied the host's
    namespace, the template's otherwise): the container's CAP_CHOWN and CAP_FOWNER must not
    change its owner or mode, on either path (a chmod 000 would break the host's /dev/null)."""
    with open(os.path.join(home, 'forking_monitor'), 'w'):
        pass                            # the first boots with a monitor of its own ...
    own, served = attacked(), attacked()    # ... and forks the second's
    log = open(os.path.join(home, 'cocker.log')).read()
    before = os.stat('/dev/null')
    try:
        for name in (own, served):
            r = inside(cocker, name, 'chmod 600 /proc/keys; chown 65534 /proc/timer_list; '
                       'echo x > /proc/keys && cat /proc/keys')
            assert r.rc == 0 and r.err.count('Read-only file system') == 2, (name, r)
        after = os.stat('/dev/null')
        assert (after.st_mode, after.st_uid, after.st_ctime_ns) == (
            before.st_mode, before.st_uid, before.st_ctime_ns)
    finally:                            # (the host's, should the attack have worked)
        os.chown('/dev/null', before.st_uid, before.st_gid)
        os.chmod('/dev/null', stat.S_IMODE(before.st_mode))


def test_a_file_command_never_joins_a_restarted_pid1_before_it_is_in_its_root(
        cocker, test_image, names, home, tmp_path):
    """A restart runs without the container lock: its PID 1 is in the host's mount namespace
    (or the template's) while it sets up, and a file command that joined it then would copy
    host files.  It waits for PID 1 to be in the container root.  Here the restarted PID 1
    waits on a FIFO that it reads its volumes from."""
    secret = tmp_path / 'host-only'
    secret.write_text('a host file\n')
    name = names('rst')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--restart', 'always',
                  '-b').rc == 0
    first = init_pid(home, name)
    fifo = container_path(home, name, 'volume')
    os.mkfifo(fifo)
    try:
        os.kill(first, signal.SIGKILL)
        def setting_up():
            try:
                pid = init_pid(home, name)
                return pid != first and os.stat('/proc/%d/root' % pid) != os.stat(
                    container_path(home, name, 'merged'))
            except (OSError, ValueError):
                return False
        wait_for(setting_up, what='a restarted PID 1 setting up')
        copy = cocker_process(home, '-a', 'getfile', '-c', name, '--src-file', str(secret),
                              '--dst-file', str(tmp_path / 'copied'))
        time.sleep(0.3)
        with open(fifo, 'w'):           # (no volumes: PID 1 goes on)
            pass
        out, err = copy.communicate(timeout=30)
        assert not (tmp_path / 'copied').exists(), 'a host file came out of the container'
        assert copy.returncode != 0 and b'not running' not in err, err
    finally:
        os.unlink(fifo)
    assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0


def test_a_dev_null_of_the_image_is_never_what_masks_proc(cocker, test_image, names, home):
    """runc CVE-2025-31133: the image's /dev/null is a link to a kernel knob; masking must
    bind the host's real 1:3, never that."""
    name = names('devnull')
    assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    os.makedirs(container_path(home, name, 'rwlayer', 'dev'))
    os.symlink('/proc/sys/kernel/core_pattern', container_path(home, name, 'rwlayer', 'dev',
                                                                'null'))
    before = open('/proc/sys/kernel/core_pattern').read()
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'stat -c "%t:%T" /proc/timer_list; echo "|/tmp/x" > /proc/timer_list')
    assert r.out == '1:3\n', r
    assert open('/proc/sys/kernel/core_pattern').read() == before


def test_sys_is_read_only_masked_and_the_containers_own(attacked, cocker, home):
    name = attacked('--net', 'BRIDGE')
    r = inside(cocker, name, 'grep " /sys " /proc/mounts; ls /sys/class/net; '
               'ls -A /sys/firmware | wc -l; touch /sys/x; mkdir /sys/kernel/y')
    lines = r.out.splitlines()
    assert lines[0].split()[3].split(',')[:4] == ['ro', 'nosuid', 'nodev', 'noexec'], r
    bridge = bridge_plan(home)[0]
    assert set(lines[1:-1]) == {'eth0', 'lo'} and bridge not in r.out, \
        'the sysfs of the container network namespace: %r' % r
    assert lines[-1] == '0'
    assert r.err.count('Read-only file system') == 2, r
    host = attacked()
    r = inside(cocker, host, 'ls /sys/class/net | wc -l; touch /sys/x')
    assert int(r.out) >= 1 and 'Read-only file system' in r.err, r


# ---- processes -------------------------------------------------------------------------

def test_a_fork_bomb_stops_at_the_default_pids_limit(attacked, cocker, home):
    name = attacked()
    pids = [d for d in container_cgroups(home, name) if os.path.exists(d + '/pids.max')]
    assert pids and open(pids[0] + '/pids.max').read().strip() == '4096'
    row = cocker('-s', 'container_limits', '-c', name).out.splitlines()[2].split()
    assert row[4] == '4096', row
    r = inside(cocker, name, '/t/probe forkbomb')
    made, _, error = r.out.split()[:3]
    assert 4000 < int(made) < 4096 and int(error) == errno.EAGAIN, r
    assert subprocess.call(['true']) == 0, 'the host still forks'
    assert inside(cocker, name, 'echo alive').out == 'alive\n'
    wait_for(lambda: int(open(pids[0] + '/pids.current').read()) < 10, what='the bomb reaped')
    unlimited = attacked('--pids-limit', 'none')
    pids = [d for d in container_cgroups(home, unlimited) if os.path.exists(d + '/pids.max')]
    assert open(pids[0] + '/pids.max').read().strip() == 'max'
    row = cocker('-s', 'container_limits', '-c', unlimited).out.splitlines()[2].split()
    assert row[4] == '-', row


# ---- the file helpers ------------------------------------------------------------------

NSS_MODULE = r'''
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void)
{
    int fd = open(MARKER, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0)
        close(fd);
}
'''
PLANTED_PYTHON = ('pwd', 'grp', 'json', 'shutil', 'tarfile', 'gzip', 'lzma', 'bz2', 'zlib',
                  'sitecustomize', 'usercustomize', 'ctypes', 'importlib')


def plant(root, marker, tmp_path):
    """An NSS module that glibc would load for any user or group lookup, and Python modules
    wherever the host's interpreter looks, each creating `marker` when loaded."""
    source = tmp_path / 'nss.c'
    source.write_text(NSS_MODULE)
    library = str(tmp_path / 'libnss_cocker.so.2')
    subprocess.check_call(['gcc', '-shared', '-fPIC', '-DMARKER="%s"' % marker, '-o', library,
                           str(source)])
    for directory in ('lib', 'lib64', 'usr/lib', 'lib/%s-linux-gnu' % MACHINE,
                      'usr/lib/%s-linux-gnu' % MACHINE):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
        shutil.copy(library, os.path.join(root, directory, 'libnss_cocker.so.2'))
    with open(os.path.join(root, 'etc', 'nsswitch.conf'), 'w') as f:
        f.write('passwd: cocker files\ngroup: cocker files\nhosts: cocker files\n')
    paths = json.loads(subprocess.check_output([PYTHON, '-c',
                                                'import sys, json; print(json.dumps(sys.path))']))
    for directory in [p for p in paths if p.startswith('/')]:
        target = os.path.join(root, directory.lstrip('/'))
        os.makedirs(target, exist_ok=True)
        for module in PLANTED_PYTHON:
            with open(os.path.join(target, module + '.py'), 'w') as f:
                f.write('open(%r, "w").close()\n' % marker)


def test_planted_nss_modules_and_python_files_are_never_loaded(attacked, cocker, home,
                                                               tmp_path, monkeypatch):
    """Docker CVE-2019-14271: the copy helper resolved owner names inside the container
    and loaded its libnss_*.so as host root.  Here it never looks a name up, loads no
    module once inside, and has no more power than the container anyway."""
    monkeypatch.chdir(tmp_path)
    name = attacked()
    marker = '/tmp/cocker-planted-%s' % uuid.uuid4().hex[:8]
    root = container_path(home, name, 'merged')
    plant(root, marker, tmp_path)
    inner_marker = os.path.join(root, marker.lstrip('/'))
    # the plant works: a lookup of a name inside the container loads the module
    subprocess.check_call(['nsenter', '-t', str(init_pid(home, name)), '-m', '--',
                           '/bin/ls', '-l', '/root'], stdout=subprocess.DEVNULL)
    assert os.path.exists(inner_marker), 'the planted module is a real one'
    os.unlink(inner_marker)
    (tmp_path / 'map.txt').write_text('${LEAF} leaf\n')
    for state in ('running', 'stopped'):
        for args in (['rplfile', '--template-file', '/root/tpl.txt', '--mapping-file',
                      'map.txt', '--instance-file', '/root/ins.txt'],
                     ['putfile', '--src-file', 'map.txt', '--dst-file', '/root/'],
                     ['getfile', '--src-file', '/root', '--dst-file', 'got-%s' % state],
                     ['getfile', '--src-file', '/etc/nsswitch.conf', '--dst-file', './']):
            r = cocker('-a', args[0], '-c', name, *args[1:])
            assert r.rc == 0, (state, args, r)
            assert not os.path.exists(marker), (state, args, 'loaded on the host')
            assert not os.path.exists(container_path(home, name, 'rwlayer',
                                                     marker.lstrip('/'))), (state, args)
        if state == 'running':
            assert cocker('-a', 'shutdown', '-c', name).rc == 0
    assert (tmp_path / 'got-running' / 'ins.txt').read_text() == '{ "leaf":"leaf" }\n'


def test_fifo_device_and_huge_templates_fail_fast(attacked, cocker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = attacked()
    r = inside(cocker, name, '/t/busybox mkfifo /root/fifo; ln -s /dev/zero /root/zero; '
               '/t/busybox truncate -s 2G /root/huge; mkdir /root/dir; echo ok')
    assert r.out == 'ok\n', r
    (tmp_path / 'map.txt').write_text('K V\n')
    for template, why in (('/root/fifo', 'is not a regular file'),
                          ('/dev/zero', 'is not a regular file'),
                          ('/root/zero', 'is a symbolic link'),
                          ('/root/huge', 'is larger than 64 MiB'),
                          ('/root/dir', 'is not a regular file')):
        r = cocker('-a', 'rplfile', '-c', name, '--template-file', template,
                   '--mapping-file', 'map.txt', timeout=30)
        assert r.rc == 255 and why in r.err and r.err.count('\n') == 1, (template, r)
    # a FIFO in the way of putfile is replaced, never opened
    (tmp_path / 'fifo').write_text('a file\n')
    assert cocker('-a', 'putfile', '-c', name, '--src-file', 'fifo', '--dst-file', '/root/',
                  timeout=30).rc == 0
    assert inside(cocker, name, 'cat /root/fifo').out == 'a file\n'
    assert cocker('-a', 'shutdown', '-c', name, timeout=30).rc == 0


@pytest.fixture
def endless(attacked, cocker, tmp_path, home):
    """(container, destination): a container held to 2% of a CPU (its file helpers too) with
    a sparse file of a terabyte, and a small tmpfs to get it into: a getfile of it runs until
    something stops it.  The quota is set once it runs (as cocker sets it: the CFS quota of
    its cgroup), so that its boot, under a slow interpreter, is not what the test waits for."""
    name = attacked()
    assert inside(cocker, name, '/t/busybox truncate -s %d /root/endless' % (1 << 40)).rc == 0
    set_cpu_quota(home, name, 2000)
    target = tmp_path / 'dst'
    target.mkdir()
    subprocess.check_call(['mount', '-t', 'tmpfs', '-o', 'size=512m', 'tmpfs', str(target)])
    try:
        yield name, str(target) + '/'
    finally:
        subprocess.check_call(['umount', str(target)])


def set_cpu_quota(home, name, quota_us):
    """The CFS quota of a running container's cgroup, as cocker sets it (-1: none)."""
    quotas = [os.path.join(d, f) for d in container_cgroups(home, name)
              for f in ('cpu.cfs_quota_us', 'cpu.max') if os.path.exists(os.path.join(d, f))]
    assert quotas, 'no cpu controller for the container'
    for path in quotas:
        with open(path, 'w') as f:
            if path.endswith('_us'):
                f.write(str(quota_us))
            else:
                f.write('%s 100000' % ('max' if quota_us < 0 else quota_us))


def copy_helper(home, name, source='/root/endless'):
    """Host pid of the getfile helper, once it runs in the container's cgroup and holds the
    source open: at work, past its own set-up (which at 2% of a CPU takes a while)."""
    procs = [os.path.join(d, 'cgroup.procs') for d in container_cgroups(home, name)
             if os.path.exists(os.path.join(d, 'pids.max'))][0]
    found = []

    def copying():
        for pid in open(procs).read().split():
            try:
                if b'getfile' not in open('/proc/%s/cmdline' % pid, 'rb').read():
                    continue
                fds = '/proc/%s/fd' % pid
                if any(os.readlink(os.path.join(fds, fd)) == source for fd in os.listdir(fds)):
                    found.append(int(pid))
                    return True
            except OSError:
                pass
        return False
    wait_for(copying, timeout=180, what='the copy helper to read %s in the container cgroup'
             % source)
    return found[0]


def test_shutdown_interrupts_a_copy_without_end(endless, cocker, home):
    """The helper runs confined, in the container's cgroup and namespaces, holding nothing of
    the host; shutdown gets through at once and the copy stops."""
    name, target = endless
    copy = subprocess.Popen([PYTHON, COCKER, '-a', 'getfile', '-c', name, '--src-file',
                             '/root/endless', '--dst-file', target],
                            env=dict(os.environ, COCKER_HOME=home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        helper = copy_helper(home, name)
        status = open('/proc/%d/status' % helper).read()
        assert 'CapEff:\t%s' % PODMAN_CAPS in status and 'Seccomp:\t2' in status, status
        for ns in ('mnt', 'pid', 'net', 'ipc', 'uts'):
            assert os.readlink('/proc/%d/ns/%s' % (helper, ns)) == os.readlink(
                '/proc/%d/ns/%s' % (init_pid(home, name), ns)), ns
        groups = [line for line in open('/proc/%d/cgroup' % helper).read().splitlines()
                  if line.endswith(':/cocker/' + name)]     # every one, v1 and v2
        assert len(groups) == len(container_cgroups(home, name)), groups
        held = [os.readlink('/proc/%d/fd/%s' % (helper, fd))
                for fd in os.listdir('/proc/%d/fd' % helper)]
        # the pipes, /dev/null, and the container's file it reads with its directory
        assert all(t.startswith('pipe:') or t in ('/dev/null', '/root/endless', '/root')
                   for t in held), 'a host file or directory in the helper: %r' % held
        start = time.time()
        r = cocker('-a', 'shutdown', '-c', name, timeout=60)
        assert r.rc == 0, r
        _, err = copy.communicate(timeout=30)
        assert copy.returncode == 255 and b'interrupted' in err, err
        assert time.time() - start < 30
        assert not os.path.exists(container_path(home, name, 'file_action'))
        assert os.listdir(target) == [], 'no staging directory left behind'
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()


def test_a_container_that_stops_the_copy_helper_does_not_stall_it(endless, cocker, home,
                                                                  terminal):
    """The helper is in the container's pid namespace, so the container may signal it: a
    SIGSTOP ends the copy with an error instead of holding it and the lock.  It has no
    controlling terminal either (nothing to push keys into with TIOCSTI)."""
    name, target = endless
    t = terminal('-a', 'getfile', '-c', name, '--src-file', '/root/endless', '--dst-file',
                 target)
    helper = copy_helper(home, name)
    helper_stat = open('/proc/%d/stat' % helper).read().rsplit(')', 1)[1].split()
    cli_stat = open('/proc/%d/stat' % t.pid).read().rsplit(')', 1)[1].split()
    assert cli_stat[4] != '0' and helper_stat[4] == '0', 'tty_nr: the helper has no terminal'
    assert helper_stat[3] != cli_stat[3], 'a session of its own'
    inner = open('/proc/%d/status' % helper).read().split('NSpid:')[1].split('\n')[0].split()[-1]
    # the kill must not share 2% of a CPU with the copy it stops (at 10% the copy still
    # takes many seconds to fill the tmpfs)
    set_cpu_quota(home, name, 10000)
    r = inside(cocker, name, 'kill -STOP %s' % inner)
    assert r.rc == 0, r
    assert t.wait(timeout=60) == 255
    assert b'stopped the copy helper' in t.output, t.output
    assert not os.path.exists('/proc/%d' % helper) or 'zombie' in open(
        '/proc/%d/status' % helper).read()


def test_a_link_an_earlier_getfile_brought_is_never_written_through(attacked, cocker, home,
                                                                    tmp_path):
    """A first getfile brings data/m -> a host path; the container then makes m a directory
    holding passwd.  The next getfile into the same place must not write through the link,
    whether the stream carries the directory m (as ours does) or not (as a hijacked helper's
    could)."""
    victim = tmp_path / 'victim'
    victim.mkdir()
    backup = tmp_path / 'backup'
    backup.mkdir()
    name = attacked()
    r = inside(cocker, name, 'mkdir /data; ln -s %s /data/m' % victim)
    assert r.rc == 0, r
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/data', '--dst-file',
                  str(backup) + '/').rc == 0
    assert os.readlink(str(backup / 'data' / 'm')) == str(victim)
    r = inside(cocker, name, 'rm /data/m; mkdir /data/m; echo pwned > /data/m/passwd')
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/data', '--dst-file',
                  str(backup) + '/').rc == 0
    assert os.listdir(str(victim)) == []
    assert (backup / 'data' / 'm' / 'passwd').read_text() == 'pwned\n'
    assert not (backup / 'data' / 'm').is_symlink()
    # a stream without the directory member, into a destination holding the link again
    shutil.rmtree(str(backup / 'data' / 'm'))
    os.symlink(str(victim), str(backup / 'data' / 'm'))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=tarfile.PAX_FORMAT) as t:
        for info, data in (member('data/m/passwd', data=b'pwned\n'),):
            t.addfile(info, io.BytesIO(data))
    cocker_module.HOME = home
    with pytest.raises(OSError):            # a member below a directory it never made
        cocker_module.unpack_tree(io.BytesIO(raw.getvalue()).read, str(backup), 'data',
                                  'data', on_host=True)
    assert os.listdir(str(victim)) == []
    assert sorted(os.listdir(str(backup))) == ['data'], 'no staging directory left'


def test_getfile_hands_the_host_no_setuid_program(attacked, cocker, tmp_path):
    name = attacked()
    r = inside(cocker, name, 'cp /t/busybox /root/suid; chown 0:0 /root/suid; '
               'chmod 6755 /root/suid; stat -c %a /root/suid')
    assert r.out == '6755\n', r
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/root/suid', '--dst-file',
                  str(tmp_path) + '/').rc == 0
    st = os.stat(str(tmp_path / 'suid'))
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0, oct(st.st_mode)


# ---- network ---------------------------------------------------------------------------

def forward_drops(home):
    """Packets counted by the DROP rule that ends the bridge's forward chain."""
    bridge = bridge_plan(home)[0]
    out = subprocess.check_output(['iptables', '-w', '-L', 'COCKER-%s-FWD' % bridge, '-v',
                                   '-x', '-n']).decode()
    return sum(int(l.split()[0]) for l in out.splitlines() if ' DROP ' in ' %s ' % l)


def test_a_neighbour_routing_the_subnet_reaches_published_ports_only(server, cocker, home,
                                                                      outside):
    port = free_port()
    name = server('--port-mapping', '%d:80' % port)
    r = cocker('-a', 'run', '-c', name, '--cmd', '/bb/busybox nc -ll -p 81 -e /bb/busybox '
               'echo unpublished </dev/null >/dev/null 2>&1 &')
    assert r.rc == 0, r
    vip = vip_of(home, name)
    address = open(os.path.join(home, 'network.conf')).read().split('address = ')[1].strip()
    subnet = str(ipaddress.ip_interface(address).network)
    subprocess.check_call(['ip', '-n', outside.netns, 'route', 'add', subnet, 'via',
                           outside.host_ip])
    assert fetch(vip, 81).startswith('unpublished'), 'the host itself reaches it'
    assert fetch(outside.host_ip, port, netns=outside.netns).startswith(name), \
        'the published port, through the host address'
    drops = forward_drops(home)
    assert fetch(vip, 81, netns=outside.netns, timeout=1.5).startswith('ERROR'), \
        'an unpublished port'
    assert fetch(vip, 80, netns=outside.netns, timeout=1.5).startswith('ERROR'), \
        'the container port of a mapping, directly'
    assert forward_drops(home) > drops, "cocker's rule dropped them, not some other"


def test_the_host_reaches_the_container_port_through_vip_and_host_port(server, cocker, home):
    """The manual's `ssh root@166.88.0.2 -p 2222`: VIP:HOST_PORT from the host."""
    port = free_port()
    name = server('--port-mapping', '%d:80' % port)
    other = server()
    assert fetch(vip_of(home, name), port).startswith(name)
    assert fetch(vip_of(home, other), port, timeout=1).startswith('ERROR'), \
        'only the VIP of the mapping is caught'


def test_the_bridge_takes_no_router_advertisements(server, home):
    if not os.path.exists('/proc/sys/net/ipv6'):
        pytest.skip('this host has no IPv6: nothing to advertise')
    bridge = bridge_plan(home)[0]
    forwarding = open('/proc/sys/net/ipv6/conf/all/forwarding').read()
    server()
    assert open('/proc/sys/net/ipv6/conf/%s/accept_ra' % bridge).read().strip() == '0'
    assert open('/proc/sys/net/ipv6/conf/all/forwarding').read() == forwarding


def test_ping_works_without_net_raw(attacked, cocker, home):
    if cocker_module.find_binary('ping') is None:
        pytest.fail('no ping on this host for the test image: tests/run.sh installs it')
    host_range = open('/proc/sys/net/ipv4/ping_group_range').read()
    bridged = attacked('--net', 'BRIDGE')
    gateway = bridge_plan(home)[1]
    r = inside(cocker, bridged, 'ping -c 1 -W 5 %s' % gateway)
    assert r.rc == 0 and '1 received' in r.out, r
    custom = attacked('--net', 'CUSTOM')
    r = inside(cocker, custom, 'ping -c 1 -W 5 127.0.0.1')
    assert r.rc == 0 and '1 received' in r.out, r
    assert open('/proc/sys/net/ipv4/ping_group_range').read() == host_range


# ---- text from outside -----------------------------------------------------------------

def archive(path, members):
    """A .cockerimage of (TarInfo, data or None)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    with open(path, 'wb') as f:
        f.write(gzip.compress(raw.getvalue()))
    return raw.getvalue()


def member(name, kind=tarfile.REGTYPE, data=b''):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info, data if kind == tarfile.REGTYPE else None


def test_control_characters_from_archives_never_reach_the_terminal(cocker, home, tmp_path):
    evil = '\x1b]0;PWNED\x07\x1b[2J\x9b'
    hostile = str(tmp_path / 'hostile.cockerimage')
    archive(hostile, [member('%s/../../x' % evil, data=b'x')])
    r = cocker('-a', 'import', '--image-file', hostile, '-m', 'esc1')
    assert r.rc == 255 and "'..'" in r.err, r
    assert '\x1b' not in r.err and '\x07' not in r.err and '\x9b' not in r.err, repr(r.err)
    assert '\\x1b]0;PWNED\\x07' in r.err, repr(r.err)
    device = str(tmp_path / 'device.cockerimage')
    archive(device, [member('dev%s' % evil, kind=tarfile.CHRTYPE), member('ok', data=b'ok')])
    r = cocker('-a', 'import', '--image-file', device, '-m', 'esc2')
    assert r.rc == 0 and 'skipped' in r.err and '\x1b' not in r.err, repr(r.err)
    assert cocker('-a', 'del_image', '-m', 'esc2').rc == 0
    named = str(tmp_path / ('x%s.cockerimage' % evil))
    shutil.copy(device, named)
    r = cocker('-a', 'import', '--image-file', named)
    assert r.rc != 0 and '\x1b' not in r.err and r.err.count('\n') == 1, repr(r.err)
    assert '\x1b' not in open(os.path.join(home, 'cocker.log')).read()


def test_malformed_tar_number_fields_are_refused(cocker, tmp_path):
    """GNU tar skips a leading NUL of a number field that Python's tarfile (and the old
    guard) read as empty, 0: the two would disagree on where the member ends."""
    for size_field, why in ((b'\x0000000001130', 'leading NUL'), (b'0000000113x\0', 'stray'),
                            (b'\0' * 12, 'blank')):
        raw = bytearray(archive(str(tmp_path / 'ok.tar.gz'),
                                [member('a', data=b'y' * 600), member('b', data=b'z')]))
        raw[124:136] = size_field
        raw[148:156] = b' ' * 8
        raw[148:155] = ('%06o\0' % (sum(raw[:512]))).encode()
        path = str(tmp_path / 'bad.cockerimage')
        with open(path, 'wb') as f:
            f.write(gzip.compress(bytes(raw)))
        r = cocker('-a', 'import', '--image-file', path, '-m', 'badnum')
        assert r.rc == 255 and 'malformed number field' in r.err, (why, r)
        assert cocker('-s', 'images').out.find('badnum') < 0


def test_a_size_walk_never_follows_a_directory_swapped_for_a_link(cocker, test_image,
                                                                  names, home):
    name = names('walk')
    loop = ('sh -c "while :; do rm -rf /root/d; mkdir -p /root/d/e/f; rm -rf /root/d; '
            'ln -s / /root/d; done"')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '-b', '-e', loop).rc == 0
    for _ in range(20):
        rows = [l for l in cocker('-s', 'containers').out.splitlines()
                if l.startswith(name + ' ')]
        number, unit = rows[0][81:91].split()           # the size column
        assert unit in ('B', 'KB') or (unit == 'MB' and int(number) < 64), rows
    assert cocker('-a', 'kill', '-c', name).rc == 0


def test_removing_a_tree_never_opens_what_its_links_point_to(cocker, test_image, names, home,
                                                             tmp_path):
    # links in the rwlayer to a host FIFO (an open without a writer would block: destroy
    # would hang) and to a host directory, watched: not one open of it (IN_OPEN) may come
    fifo, kept = str(tmp_path / 'fifo'), tmp_path / 'kept'
    os.mkfifo(fifo)
    kept.mkdir()
    (kept / 'canary').write_text('host')
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert watch >= 0 and libc.inotify_add_watch(watch, str(kept).encode(), 0x20) >= 0
    name = names('rmlinks')
    assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    planted = container_path(home, name, 'rwlayer', 'root', 'links')
    os.makedirs(planted)
    for n in range(50):
        os.symlink(fifo, os.path.join(planted, 'f%d' % n))
        os.symlink(str(kept), os.path.join(planted, 'd%d' % n))
    r = cocker('-a', 'destroy', '-c', name, timeout=20)
    try:
        opened = os.read(watch, 4096)
    except BlockingIOError:
        opened = b''
    finally:
        os.close(watch)
    assert r.rc == 0, r
    assert not opened, 'destroy opened the host directory a link of the container names'
    assert not os.path.exists(container_path(home, name))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (kept / 'canary').read_text() == 'host'
    assert not [d for d in os.listdir(os.path.join(home, 'containers')) if d.startswith('.')], \
        'nothing half-removed may be left for the next command'


def test_a_directory_swapped_for_a_link_while_getfile_unpacks_stops_the_copy(tmp_path, home):
    """The destination may be a volume the container writes to, so its processes can reach
    the hidden directory getfile unpacks into: a directory there swapped for a link to the
    host must stop the copy, never be written through."""
    victim = tmp_path / 'victim'
    victim.mkdir()
    destination = tmp_path / 'vol'
    destination.mkdir()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=tarfile.PAX_FORMAT) as t:
        for name in ('x', 'x/a'):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        for name, size in (('x/a/first', 1 << 20), ('x/a/second', 10)):
            info, payload = member(name, data=b'c' * size)
            t.addfile(info, io.BytesIO(payload))
    data, swapped = io.BytesIO(raw.getvalue()), []

    def read(n):                        # the container's move, while the first file is written
        if data.tell() >= 1 << 19 and not swapped:
            hidden = [e for e in os.listdir(str(destination)) if e.startswith('.cocker-copy.')]
            inner = destination / hidden[0] / 'x'
            os.rename(str(inner / 'a'), str(inner / 'a.old'))
            os.symlink(str(victim), str(inner / 'a'))
            swapped.append(True)
        return data.read(4096)
    cocker_module.HOME = home
    with pytest.raises(OSError):
        cocker_module.unpack_tree(read, str(destination), 'x', 'x', on_host=True)
    assert swapped and os.listdir(str(victim)) == []
    assert os.listdir(str(destination)) == [], 'nothing half-done is left'


def test_a_directory_swapped_for_a_link_while_putfile_packs_brings_no_host_file(
        tmp_path, monkeypatch):
    """The source may be a volume the container writes to: a directory swapped for a link
    to a host directory between listing and descent is packed as that link, and nothing of
    the host directory goes into the stream."""
    secret = tmp_path / 'secret'
    secret.mkdir()
    (secret / 'key').write_text('HOST-PRIVATE-KEY\n')
    tree = tmp_path / 'tree'
    (tree / 'ssh').mkdir(parents=True)
    (tree / 'ssh' / 'known').write_text('container data\n')
    real_listdir = os.listdir

    def listdir_then_swap(fd):
        entries = real_listdir(fd)
        if 'ssh' in entries and not (tree / 'ssh.old').exists():
            os.rename(str(tree / 'ssh'), str(tree / 'ssh.old'))
            os.symlink(str(secret), str(tree / 'ssh'))
        return entries
    monkeypatch.setattr(cocker_module.os, 'listdir', listdir_then_swap)
    read_end, write_end = os.pipe()
    cocker_module.pack_tree(str(tree), 'tree', write_end)
    with os.fdopen(read_end, 'rb') as f:
        packed = f.read()
    assert b'HOST-PRIVATE-KEY' not in packed
    with tarfile.open(fileobj=io.BytesIO(packed)) as t:
        link = t.getmember('tree/ssh')
    assert link.issym() and link.linkname == str(secret)


def test_getfile_never_follows_a_link_to_a_directory_at_the_destination(attacked, cocker,
                                                                        tmp_path):
    """A first getfile brings a link to a host directory as DEST; the next one must not put
    the file into that directory (it asks for DEST/ to mean it)."""
    victim = tmp_path / 'victim'
    victim.mkdir()
    backup = tmp_path / 'backup'
    backup.mkdir()
    name = attacked()
    assert inside(cocker, name, 'ln -sfn %s /tmp/authorized_keys' % victim).rc == 0
    dest = str(backup / 'authorized_keys')
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/tmp/authorized_keys',
                  '--dst-file', dest).rc == 0
    assert os.readlink(dest) == str(victim)
    assert inside(cocker, name, 'rm /tmp/authorized_keys; '
                  'echo ATTACKER-KEY > /tmp/authorized_keys').rc == 0
    r = cocker('-a', 'getfile', '-c', name, '--src-file', '/tmp/authorized_keys',
               '--dst-file', dest)
    assert r.rc == 255 and 'is a symbolic link to a directory' in r.err, r
    assert os.listdir(str(victim)) == []
    r = cocker('-a', 'getfile', '-c', name, '--src-file', '/tmp/authorized_keys',
               '--dst-file', dest + '/')
    assert r.rc == 0 and (victim / 'authorized_keys').read_text() == 'ATTACKER-KEY\n', \
        'DEST/ says: into the directory it points to'
