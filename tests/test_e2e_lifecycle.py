"""The container lifecycle end to end, as root, with real namespaces, overlays and ptys."""

import glob
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import (container_path, cocker_process, load_script, wait_for, COCKER,
                      COCKERINIT, PYTHON)


def status_of(cocker, name):
    r = cocker('-s', 'containers')
    assert r.rc == 0, r
    for line in r.out.splitlines():
        if line.split(' ', 1)[0] == name:
            return line.split()[-1]
    raise AssertionError('%s not listed in %r' % (name, r.out))


def mounts_of(home, name):
    return [line for line in open('/proc/mounts') if container_path(home, name) in line]


def test_manual_quickstart_transcript(cocker, test_image, names, terminal, home):
    name = names('qs')
    r = cocker('-s', 'images')
    assert r.out.splitlines()[0] == 'image_id                       version    modify_datetime     size      '
    assert r.out.splitlines()[1] == '-' * 68
    assert re.search(r'^test {27}_ {10}\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d \d+ MB$', r.out, re.M), r.out
    assert cocker('-a', 'create', '-m', 'test', '-c', name).out == 'OK\n'
    t = terminal('-a', 'boot', '-c', name, '-t')
    screen = t.expect('[root@%s /root] ' % name)
    assert 'connect to container ok' in screen
    assert '--- Welcome to cocker contrainer ---' in screen
    t.send('exit\r')
    t.expect('logout')
    assert t.wait() == 0
    assert status_of(cocker, name).startswith('RUNNING('), 'exit must end the session only'
    assert cocker('-a', 'shutdown', '-c', name).out == 'OK\n'
    assert status_of(cocker, name) == 'STOPED'
    assert cocker('-a', 'destroy', '-c', name).out == 'OK\n'
    assert not os.path.exists(container_path(home, name))
    assert not mounts_of(home, name)


def test_containers_listing_has_the_manual_columns(cocker, test_image, names):
    name = names('ls')
    assert cocker('-a', 'create', '-m', 'test', '-c', name, '--host', 'web').rc == 0
    lines = cocker('-s', 'containers').out.splitlines()
    assert lines[0] == ('container_id         image                hostname   net        '
                        'netns            size       status')
    assert lines[1] == '-' * 107
    row = [l for l in lines if l.startswith(name + ' ')][0]
    assert row.split() == [name, 'test', 'web', 'HOST', '0', 'B', 'STOPED'], row
    assert cocker('-s', 'container_root', '-c', name).out.strip().endswith(
        '/containers/%s/merged' % name)


def test_attach_runs_a_login_shell_and_several_sessions_work_at_once(running, terminal):
    name = running()
    first = terminal('-a', 'attach', '-c', name)
    second = terminal('-a', 'attach', '-c', name)
    for t, word in ((first, 'one'), (second, 'two')):
        t.expect('] ')
        t.send('echo hello-$((6*7))-%s\r' % word)
    assert 'hello-42-one' in first.expect('hello-42-one')
    assert 'hello-42-two' in second.expect('hello-42-two')
    for t in (first, second):
        t.send('exit\r')
        assert t.wait() == 0


def test_attach_passes_the_window_size_and_follows_resizes(running, terminal):
    name = running()
    t = terminal('-a', 'attach', '-c', name, rows=33, cols=101)
    t.expect('] ')
    t.send('stty size\r')
    t.expect('33 101')
    t.resize(40, 132)
    os.kill(t.pid, signal.SIGWINCH)
    asked = []

    def size_followed():
        # the marker's number is not in the typed line, so its echo never ends the read
        asked.append(1000 + len(asked))
        marker = 'asked-%d' % asked[-1]
        before = len(t.output)
        t.send('stty size; echo "asked-$((%d + 1))"\r' % (asked[-1] - 1))
        t.expect(marker)
        return '40 132' in t.output[before:].decode('utf-8', 'replace').split(marker)[0]
    wait_for(size_followed, what='the new window size inside the container')
    t.send('exit\r')
    assert t.wait() == 0


def test_attach_restores_the_terminal_mode(running, terminal, cocker):
    name = running()
    t = terminal('-a', 'attach', '-c', name)
    t.expect('] ')
    t.send('exit\r')
    assert t.wait() == 0
    r = cocker('-a', 'attach', '-c', name)          # no terminal: refused clearly
    assert r.rc == 255 and 'terminal' in r.err and 'Traceback' not in r.err


def test_run_keeps_stdout_and_stderr_apart_and_returns_the_exit_status(running, cocker, home):
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd', 'echo out; echo err >&2; exit 3')
    assert (r.rc, r.out, r.err) == (3, 'out\n', 'err\n')
    r = cocker('-a', 'run', '-c', name, '--cmd', 'hostname')
    assert (r.rc, r.out) == (0, name + '\n')
    r = cocker('-a', 'run', '-c', name, '--cmd', 'kill -9 $$')
    assert r.rc == 137
    r = cocker('-a', 'run', '-c', name, '-i', '--cmd', 'tr a-z A-Z', stdin=subprocess.PIPE,
               input=b'piped input\n')
    assert (r.rc, r.out) == (0, 'PIPED INPUT\n')
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat; echo end', stdin=subprocess.PIPE,
               input=b'not for the command\n')
    assert r.out == 'end\n', 'without -i the caller keeps its stdin (while read ...; do run)'
    r = cocker('-a', 'run', '-c', name, '-i', '--cmd',
               'head -c 30000000 /dev/zero & head -c 30000000 >/dev/null; wait',
               stdin=subprocess.PIPE, input=b'\0' * 30000000)
    assert r.rc == 0 and len(r.out) == 30000000, 'much input and output at once must not hang'
    from conftest import COCKER, PYTHON
    early = subprocess.run('%s %s -a run -c %s --cmd "seq 1 1000000" | head -1' % (PYTHON, COCKER, name),
                           shell=True, env=dict(os.environ, COCKER_HOME=home),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert early.stdout == b'1\n' and early.stderr == b'', early
    big = cocker('-a', 'run', '-c', name, '--cmd', 'seq 1 200000')
    assert big.rc == 0 and big.out.splitlines()[-1] == '200000' and len(big.out.splitlines()) == 200000


def test_container_is_isolated(running, cocker):
    name = running('--host', 'isohost')
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'cat /proc/1/cmdline | tr "\\0" " "; echo; hostname; ps -e -o pid= | wc -l; '
               'cat /proc/mounts')
    cmdline, hostname, count = r.out.splitlines()[:3]
    mounts = r.out.splitlines()[3:]
    assert 'cockerinit' in cmdline, 'PID 1 must be cockerinit'
    assert hostname == 'isohost'
    assert int(count) <= 6, 'host processes are visible: %s' % count
    points = [m.split()[1] for m in mounts]
    assert points[0] == '/' and mounts[0].startswith('overlay ')
    allowed = {'/', '/proc', '/dev', '/dev/pts', '/dev/shm', '/dev/console', '/proc/sys',
               '/proc/sysrq-trigger', '/proc/irq', '/proc/bus', '/proc/fs', '/sys',
               '/sys/firmware', '/sys/fs/selinux', '/sys/devices/virtual/powercap'} | {
        '/proc/' + p for p in ('interrupts', 'kcore', 'keys', 'latency_stats', 'sched_debug',
                               'timer_list', 'timer_stats', 'acpi', 'asound', 'scsi')}
    unexpected = [p for p in points if p not in allowed and not
                  re.match(r'/sys/devices/system/cpu/cpu\d+/thermal_throttle$', p)]
    assert not unexpected, points
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ls /dev')
    assert set(r.out.split()) >= {'null', 'zero', 'full', 'random', 'urandom', 'tty', 'console',
                                  'ptmx', 'pts', 'shm'}


def test_nothing_of_the_host_reaches_the_container(running, cocker, home):
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'readlink /proc/1/exe; echo "exe=$?"; ls /proc/1/map_files >/dev/null 2>&1; '
               'echo "maps=$?"; grep CapBnd /proc/self/status; grep CapEff /proc/1/status; '
               'ls /proc/self/fd')
    assert 'exe=1' in r.out, 'PID 1 must be non-dumpable: %r' % r.out
    assert 'maps=2' in r.out or 'maps=1' in r.out
    assert 'CapBnd:\t00000000800405fb' in r.out
    assert 'CapEff:\t00000000800405fb' in r.out
    fds = r.out.split('CapEff:\t00000000800405fb\n')[1].split()
    assert fds == ['0', '1', '2', '3'], 'descriptors leaked into the container: %r' % fds
    init_pid = int(open(container_path(home, name, 'init_pid')).read())
    assert os.readlink('/proc/%d/cwd' % init_pid) == '/'
    host_devices = {os.stat(p).st_dev for p in ('/', '/dev', '/proc', home)}
    for fd in os.listdir('/proc/%d/fd' % init_pid):
        path = '/proc/%d/fd/%s' % (init_pid, fd)
        target = os.readlink(path)
        assert os.stat(path).st_dev not in host_devices, \
            'cockerinit holds a host file on fd %s: %s' % (fd, target)
    assert cocker('-a', 'run', '-c', name, '--cmd', 'test -e %s' % home).rc == 1


#: what a run command inherits, as its shell sees it (bash: the shell is itself the command),
#: and the OOM score of the session's process that relays for it (its parent)
INHERITED = ('pwd; umask; cat /proc/self/oom_score_adj; '
             'grep -E "^(SigBlk|NoNewPrivs|CapEff|CapBnd)" /proc/self/status; '
             'set -- $(cat /proc/$$/stat); [ "$6" = "$1" ] && echo "a session of its own"; '
             'echo "relay $(cat /proc/$PPID/oom_score_adj)"; '
             'grep SigIgn /proc/self/status; ls /proc/self/fd')


def test_a_run_command_inherits_the_same_whether_spawned_or_forked(cocker, test_image, names,
                                                                   home):
    """As root on pipes, a run command is spawned (no copy of the session's process);
    as a named user it is forked: both start from the same state, whatever the umask and
    OOM score of the command that booted the container."""
    from conftest import COCKER_COMMAND, PYTHON
    name = names()
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--no-new-privs').rc == 0
    boot = subprocess.run(['sh', '-c', 'echo 300 > /proc/self/oom_score_adj; umask 077; '
                           'exec "$@"', 'sh'] + COCKER_COMMAND + ['-a', 'boot', '-c', name],
                          env=dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert boot.returncode == 0, boot
    init_pid = int(open(container_path(home, name, 'init_pid')).read())
    with open('/proc/%d/oom_score_adj' % init_pid) as f:
        shield = f.read().strip()
    spawned = cocker('-a', 'run', '-c', name, '--cmd', INHERITED)
    forked = cocker('-a', 'run', '-c', name, '--user', '0:0', '--cmd', INHERITED)
    assert spawned.rc == 0 and forked.rc == 0, (spawned, forked)
    mine, theirs = (r.out.split('SigIgn:\t') for r in (spawned, forked))
    assert mine[0] == theirs[0], (spawned.out, forked.out)
    assert mine[0].startswith('/root\n0022\n0\n') and 'NoNewPrivs:\t1' in mine[0] and \
        'a session of its own' in mine[0] and 'relay %s\n' % shield in mine[0], mine[0]
    # no signal ignored but glibc's two, which its spawn leaves ignored (32 and 33): seen
    # there, they tell that the command was spawned, where Python has posix_spawn
    spawns = subprocess.check_output([PYTHON, '-c', 'import sys; print(sys.version_info >= '
                                      '(3, 8))']).decode().strip() == 'True'
    assert int(mine[1].split()[0], 16) == (3 << 31 if spawns else 0), spawned.out
    assert int(theirs[1].split()[0], 16) == 0, forked.out
    assert mine[1].split()[1:] == theirs[1].split()[1:] == ['0', '1', '2', '3']


def test_orphans_are_reaped(running, cocker):
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd', '(sleep 0.2 &) ; (sh -c "sleep 0.3 &" &); exit 0')
    assert r.rc == 0
    seen = []

    def orphans_gone():
        # an orphan never reaped stays in the table as a zombie: then this never comes true
        r = cocker('-a', 'run', '-c', name, '--cmd', 'ps -e -o stat=,pid=,comm=')
        seen.append(r.out)
        return r.rc == 0 and not [l for l in r.out.splitlines() if l.split()[-1] == 'sleep']
    try:
        wait_for(orphans_gone, what='the orphaned sleeps to end and be reaped')
    except AssertionError as e:
        raise AssertionError('%s; the last ps: %r' % (e, seen[-1]))
    assert not [l for l in seen[-1].splitlines() if l.strip().startswith('Z')], seen[-1]


def test_kill_9_of_pid_1_then_boot_again(running, cocker, home):
    name = running()
    os.kill(int(open(container_path(home, name, 'init_pid')).read()), signal.SIGKILL)
    wait_for(lambda: status_of(cocker, name) == 'STOPED', what='STOPED after kill -9')
    assert not mounts_of(home, name)
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


def test_kill_9_of_the_monitor_is_detected_and_repaired(running, cocker, home):
    name = running()
    init_pid = int(open(container_path(home, name, 'init_pid')).read())
    os.kill(int(open(container_path(home, name, 'pid')).read()), signal.SIGKILL)
    wait_for(lambda: not os.path.exists('/proc/%d' % init_pid), what='PID 1 to die with the monitor')
    assert status_of(cocker, name) == 'STOPED'
    assert not mounts_of(home, name), 'leftover mounts must be cleaned by the next command'
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


def monitor_of(home, name):
    return int(open(container_path(home, name, 'pid')).read())


def descriptors_into(pid, directory):
    """What the descriptors of process pid open under directory."""
    found = []
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            target = os.readlink('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if target == directory or target.startswith(directory + '/'):
            found.append(target)
    return found


def monitors_of_home(home):
    """Pids of the cocker-monitor processes working for this COCKER_HOME."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/comm' % pid) as f:
                comm = f.read().strip()
            with open('/proc/%s/environ' % pid, 'rb') as f:
                env = f.read().split(b'\0')
        except OSError:
            continue
        if comm == 'cocker-monitor' and ('COCKER_HOME=%s' % home).encode() in env:
            found.append(int(pid))
    return sorted(found)


def first_booted_second_made(cocker, test_image, names, home, boot=True):
    """Two new containers: the first booted (boot=False: the test boots it), its monitor the
    one that boots ask to fork theirs (the file that names it is emptied before), the
    second not."""
    first, second = names(), names()
    for name in (first, second):
        assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    with open(os.path.join(home, 'forking_monitor'), 'w'):
        pass
    if boot:
        assert cocker('-a', 'boot', '-c', first).rc == 0
        assert open(os.path.join(home, 'forking_monitor')).read() == first
    return first, second


def test_one_monitor_forks_the_monitors_of_the_boots_after_it(cocker, test_image, names, home):
    first, second = first_booted_second_made(cocker, test_image, names, home)
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert r.rc == 0 and r.out == 'OK\n', r
    assert 'forked by the monitor of %s' % first in r.err, r.err
    a, b = monitor_of(home, first), monitor_of(home, second)
    status = dict(line.split(':\t', 1) for line in open('/proc/%d/status' % b).read().splitlines())
    assert int(status['PPid']) != a and os.getsid(b) == b, 'a daemon of its own, not a child'
    assert not descriptors_into(b, container_path(home, first)), \
        'nothing of the first container may stay open in the second one\'s monitor'
    with open('/proc/%d/environ' % b, 'rb') as f:
        assert ('COCKER_HOME=%s' % home).encode() in f.read().split(b'\0')
    assert not os.path.exists(container_path(home, second, 'monitor.sock')), \
        'a forked monitor forks none: the kernel would copy a longer chain at every fork'
    # the first one's end, even by kill -9, is its own: the second runs on
    os.kill(a, signal.SIGKILL)
    wait_for(lambda: status_of(cocker, first) == 'STOPED', what='the first container STOPED')
    assert not mounts_of(home, first)
    assert status_of(cocker, second).startswith('RUNNING')
    assert cocker('-a', 'run', '-c', second, '--cmd', 'echo alive').out == 'alive\n'
    # the next boot forks its own monitor, which takes over
    r = cocker('-d', '-a', 'boot', '-c', first)
    assert r.rc == 0 and 'forked by' not in r.err, r
    assert open(os.path.join(home, 'forking_monitor')).read() == first
    assert cocker('-a', 'shutdown', '-c', second).rc == 0
    assert not mounts_of(home, second)
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert r.rc == 0 and 'forked by the monitor of %s' % first in r.err, r
    assert cocker('-a', 'run', '-c', first, '--cmd', 'echo still').out == 'still\n'


def test_after_an_upgrade_the_new_code_forks_the_monitors(cocker, test_image, names, home,
                                                        tmp_path):
    """The monitor that forks the others runs the code from before an upgrade (here: a copy
    elsewhere), so it refuses the boots of the new code: the first such boot's own monitor
    takes over the forking, the next boot's monitor is its fork; the old one runs on."""
    old = tmp_path / 'old'
    old.mkdir()
    for script in (COCKER, COCKERINIT):
        shutil.copy(script, str(old / os.path.basename(script)))
    first, second = first_booted_second_made(cocker, test_image, names, home, boot=False)
    third = names()
    assert cocker('-a', 'create', '-m', test_image, '-c', third).rc == 0
    env = dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON)
    booted = subprocess.run(['/bin/sh', str(old / 'cocker.py'), '-a', 'boot', '-c', first],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert booted.returncode == 0, booted
    assert open(os.path.join(home, 'forking_monitor')).read() == first
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert r.rc == 0 and 'forks none for %s: the command runs other code' % second in r.err, r
    assert open(os.path.join(home, 'forking_monitor')).read() == second
    r = cocker('-d', '-a', 'boot', '-c', third)
    assert r.rc == 0 and 'forked by the monitor of %s' % second in r.err, r.err
    assert status_of(cocker, first).startswith('RUNNING')
    assert cocker('-a', 'run', '-c', first, '--cmd', 'echo old').out == 'old\n'


def test_a_run_and_a_listing_load_none_of_the_boots_code(cocker, running):
    """A command loads only the chapters it calls into (see Loading): -v none of them, a run
    the socket's, a listing its own."""
    name = running()
    r = cocker('-d', '-v')
    assert r.rc == 0 and 'loaded the chapter' not in r.err, r
    boots = {'Boot sequence', 'Network', 'Mounts and the container root', 'Image store',
             'Cgroups'}
    r = cocker('-d', '-a', 'run', '-c', name, '--cmd', 'echo hi')
    loaded = re.findall(r'loaded the chapter (.*)', r.err)
    assert r.out == 'hi\n' and 'Talking to cockerinit' in loaded, r
    assert not boots & set(loaded) and 'Listings' not in loaded, loaded
    r = cocker('-d', '-s', 'containers')
    loaded = re.findall(r'loaded the chapter (.*)', r.err)
    assert name in r.out and 'Listings' in loaded, r
    assert not boots & set(loaded) and 'Talking to cockerinit' not in loaded, loaded


def test_a_copy_on_a_read_only_file_system_runs_compiled_whole(tmp_path):
    """No cache can be made beside it: each command compiles the file whole (a tenth of
    what splitting it costs), loads nothing later, and writes nothing there."""
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    for script in (COCKER, COCKERINIT):
        shutil.copy(script, str(bindir))
    subprocess.check_call(['mount', '--bind', str(bindir), str(bindir)])
    try:
        subprocess.check_call(['mount', '-o', 'remount,bind,ro', str(bindir)])
        env = dict(os.environ, COCKER_HOME=str(tmp_path / 'home'), COCKER_PYTHON=PYTHON)
        for args in (['-v'], ['-d', '-s', 'images']):
            r = subprocess.run(['/bin/sh', str(bindir / 'cocker.py')] + args, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            assert r.returncode == 0 and (args != ['-v'] or r.stdout.startswith(b'cocker v')), r
            assert b'loaded the chapter' not in r.stderr, r.stderr    # (split: Listings)
        assert sorted(os.listdir(str(bindir))) == ['cocker.py', 'cockerinit.py']
    finally:
        subprocess.call(['umount', str(bindir)])


def container_mounts(cocker, name):
    """(mount point, its options) of each mount the container sees, in order."""
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /proc/self/mountinfo')
    assert r.rc == 0, r
    return [(line.split()[4], line.split()[5]) for line in r.out.splitlines()]


LOOK_INTO_THE_TEMPLATE = """
import importlib.util, os, sys
def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
cocker = load_script('cocker', sys.argv[1])
init = load_script('cockerinit', sys.argv[2])
cocker.HOME = sys.argv[3]
before = open('/proc/self/mountinfo').read()
cocker.make_mount_template(init)
assert open('/proc/self/mountinfo').read() == before, 'the template changed the host table'
pid = os.fork()
if pid == 0:
    cocker.setns(cocker.MOUNT_TEMPLATE, cocker.CLONE_NEWNS)
    cocker.unshare(cocker.CLONE_NEWNS)
    cocker.mount('proc', '/proc', 'proc')
    print(sorted(os.listdir('/')))
    for line in open('/proc/self/mountinfo'):
        print(line.split()[4], line.split()[5], line.split()[8])
    cocker.open_devnull('/null')
    try:
        os.mkdir('/x')
    except OSError as e:
        print(e.strerror)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_the_mount_template_is_one_read_only_tmpfs_and_the_host_keeps_its_table(home):
    """What PID 1s copy: a namespace of one read-only tmpfs with /rootfs, /proc and a real
    /dev/null, none of the host's mounts; making it mounts nothing on the host."""
    out = subprocess.check_output([PYTHON, '-c', LOOK_INTO_THE_TEMPLATE, COCKER, COCKERINIT,
                                   home], cwd='/').decode()
    lines = out.splitlines()
    assert lines[0] == "['null', 'proc', 'rootfs']", out
    assert [l.split()[0] for l in lines[1:3]] == ['/', '/proc'] and len(lines) == 4, out
    assert lines[1].split()[1].startswith('ro,') and lines[1].split()[2] == 'tmpfs', out
    assert 'nosuid' in lines[1].split()[1] and 'noexec' in lines[1].split()[1], out
    assert lines[3] == 'Read-only file system', out


def test_pid1_from_the_mount_template_sets_up_the_root_as_one_from_the_hosts_table(
        cocker, test_image, names, home, tmp_path):
    """A PID 1 whose monitor a sibling forked copies the mount template, its root and volumes
    taken from the host as detached copies; one whose monitor the command forked copies the
    host's table.  Both containers see the same mounts; neither PID 1 keeps a descriptor of a
    directory or a namespace; and a volume on a shared mount, with another volume inside it,
    sends nothing back to the host (the copies are made private)."""
    shared = tmp_path / 'shared'
    shared.mkdir()
    subprocess.check_call(['mount', '-t', 'tmpfs', 'cocker-test-shared', str(shared)])
    try:
        subprocess.check_call(['mount', '--make-shared', str(shared)])
        (shared / 'inner').mkdir()
        (shared / 'ro').mkdir()
        volumes = ['--volume', '%s:/data' % shared, '--volume', '%s/ro:/data/inner:ro' % shared]
        first, second = names(), names()
        for name in (first, second):
            assert cocker('-a', 'create', '-m', test_image, '-c', name, *volumes).rc == 0
        with open(os.path.join(home, 'forking_monitor'), 'w'):
            pass
        host_before = [l.split()[4] for l in open('/proc/self/mountinfo')]
        assert cocker('-a', 'boot', '-c', first).rc == 0
        r = cocker('-d', '-a', 'boot', '-c', second)
        assert r.rc == 0 and 'forked by the monitor of %s' % first in r.err, r
        log = open(os.path.join(home, 'cocker.log')).read()
        assert 'PID 1 of %s: in a copy of the mount namespace template' % second in log
        assert 'PID 1 of %s: in a copy' % first not in log
        seen = [container_mounts(cocker, name) for name in (first, second)]
        assert seen[0] == seen[1], seen  # (mount points and options)
        for mounts in seen:
            options = dict(mounts)
            assert 'nodev' in options['/data'].split(',') and options['/data'].startswith('rw')
            assert options['/data/inner'].startswith('ro,'), options
        for name in (first, second):
            r = cocker('-a', 'run', '-c', name, '--cmd', 'touch /data/%s; touch /data/inner/x'
                       % name)
            assert r.rc != 0 and 'Read-only' in r.err and (shared / name).exists(), r
        host_after = [l.split()[4] for l in open('/proc/self/mountinfo')]
        assert sorted(set(host_after) - set(host_before)) == sorted(
            container_path(home, name, 'merged') for name in (first, second)), \
            'a mount below a shared volume reached the host'
        for name in (first, second):
            pid = int(open(container_path(home, name, 'init_pid')).read())
            for fd in os.listdir('/proc/%d/fd' % pid):
                path = '/proc/%d/fd/%s' % (pid, fd)
                assert not os.path.isdir(path) and not os.readlink(path).startswith('mnt:'), \
                    'PID 1 of %s holds %s' % (name, os.readlink(path))
        for name in (first, second):
            assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0
    finally:
        subprocess.call(['umount', '-R', str(shared)])


def test_a_monitor_forks_so_many_then_the_next_boots_own_takes_over(cocker, test_image, names,
                                                                    home):
    """The kernel visits every process that maps a shared page (reclaim, migration, DAMON):
    one monitor forks SIBLINGS_PER_MONITOR, no more."""
    most = load_script('cocker_limits', COCKER).SIBLINGS_PER_MONITOR
    first, second = first_booted_second_made(cocker, test_image, names, home)
    made = [names() for _ in range(most + 1)]
    for name in made:
        assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    forkers = []
    for name in made:
        r = cocker('-d', '-a', 'boot', '-c', name)
        assert r.rc == 0, r
        forker = re.search(r'forked by the monitor of (\S+)', r.err)
        forkers.append(forker and forker.group(1))
    assert forkers == [first] * most + [None]
    assert not os.path.exists(container_path(home, first, 'monitor.sock'))
    assert open(os.path.join(home, 'forking_monitor')).read() == made[-1]
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert r.rc == 0 and 'forked by the monitor of %s' % made[-1] in r.err, r
    assert status_of(cocker, first).startswith('RUNNING')


def test_a_boot_in_another_context_forks_its_own_monitor(cocker, test_image, names, home):
    """A monitor made by a sibling is made as if the command had forked it: a command whose
    limits differ forks its own, and the container gets the command's limits."""
    import resource
    first, second = first_booted_second_made(cocker, test_image, names, home)
    r = cocker('-d', '-a', 'boot', '-c', second, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (777, 777)))
    assert r.rc == 0, r
    assert 'forks none for %s: the command differs in its limits' % second in r.err, r.err
    assert cocker('-a', 'run', '-c', second, '--cmd', 'ulimit -n').out == '777\n'
    assert open(os.path.join(home, 'forking_monitor')).read() == first, \
        'the one that forks for the others stays while it runs'
    assert cocker('-a', 'run', '-c', first, '--cmd', 'ulimit -n').out != '777\n'


def test_a_one_shot_run_forked_by_a_sibling_returns_its_exit_status(cocker, running, home):
    running()                           # the monitor that forks the one-shot's
    r = cocker('-d', '-a', 'create', '-m', 'test', '-c', 'oneshot-sib', '-b', '-e',
               "sh -c 'cat; exit 3'", '--rm', '-i', input=b'hello\n')
    assert 'forked by the monitor of' in r.err, r.err
    assert (r.rc, r.out) == (3, 'hello\n'), r
    assert not os.path.exists(container_path(home, 'oneshot-sib'))


#: a command that boots under a subreaper (its orphans are its own), until its stdin closes
UNDER_A_SUBREAPER = """
import ctypes, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)         # PR_SET_CHILD_SUBREAPER
subprocess.check_call(sys.argv[1:], stdout=subprocess.DEVNULL)
print('booted', flush=True)
sys.stdin.read()
"""


def test_a_monitor_under_a_subreaper_forks_for_no_other_command(cocker, test_image, names, home):
    from conftest import COCKER, PYTHON
    first, second = first_booted_second_made(cocker, test_image, names, home, boot=False)
    reaper = subprocess.Popen([PYTHON, '-c', UNDER_A_SUBREAPER, '/bin/sh', COCKER, '-a', 'boot',
                               '-c', first], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON))
    try:
        assert reaper.stdout.readline() == b'booted\n'
        a = monitor_of(home, first)
        assert open('/proc/%d/stat' % a).read().rsplit(')', 1)[1].split()[1] == str(reaper.pid)
        r = cocker('-d', '-a', 'boot', '-c', second)
        assert r.rc == 0, r
        assert 'forks none for %s: this monitor runs under a subreaper' % second in r.err, r.err
        b = monitor_of(home, second)
        assert open('/proc/%d/stat' % b).read().rsplit(')', 1)[1].split()[1] == '1'
        # which then serves no more: the next boot's own monitor takes over
        assert not os.path.exists(container_path(home, first, 'monitor.sock'))
        assert cocker('-a', 'shutdown', '-c', second).rc == 0
        assert cocker('-a', 'boot', '-c', second).rc == 0
        assert open(os.path.join(home, 'forking_monitor')).read() == second
        assert cocker('-a', 'shutdown', '-c', first).rc == 0
    finally:
        reaper.stdin.close()
        reaper.wait(30)


def test_a_boot_in_its_own_time_namespace_lends_it_to_no_later_boot(cocker, test_image, names,
                                                                      home, not_run):
    from conftest import COCKER, PYTHON
    if subprocess.call(['unshare', '-T', '--fork', '--boottime', '1000000', 'true'],
                       stderr=subprocess.DEVNULL) != 0:
        not_run('time namespaces (test_a_boot_in_its_own_time_namespace_...): unshare -T fails')
        return
    first, second = first_booted_second_made(cocker, test_image, names, home, boot=False)
    env = dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON)
    subprocess.check_call(['unshare', '-T', '--fork', '--boottime', '1000000', '/bin/sh', COCKER,
                           '-a', 'boot', '-c', first], env=env, stdout=subprocess.DEVNULL)
    uptime = lambda name: float(cocker('-a', 'run', '-c', name, '--cmd',
                                       'cat /proc/uptime').out.split()[0])
    assert uptime(first) > 1000000
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert 'forks none for %s: the command differs in its time namespace' % second in r.err, r
    assert uptime(second) < 1000000


def test_a_boot_that_gave_up_on_a_stopped_monitor_forks_its_own(cocker, test_image, names, home):
    """The monitor that would fork is stopped (SIGSTOP): the boot forks its own after
    SIBLING_TIMEOUT; resumed, the stopped one forks nothing for the stale order."""
    first, second = first_booted_second_made(cocker, test_image, names, home)
    a = monitor_of(home, first)
    os.kill(a, signal.SIGSTOP)
    try:
        r = cocker('-d', '-a', 'boot', '-c', second)
    finally:
        os.kill(a, signal.SIGCONT)
    assert r.rc == 0 and r.out == 'OK\n', r
    assert 'forks none for %s' % second in r.err, r.err
    expected = sorted([a, monitor_of(home, second)])
    time.sleep(0.3)                     # (what would linger, an extra monitor, has appeared)
    assert [p for p in monitors_of_home(home) if p in expected or p > a] == expected
    for name in (first, second):
        assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


#: a command that asks the monitor of sys.argv[2] to fork the monitor of sys.argv[3], prints
#: the pid it answers with and goes without giving the go (cocker loaded as its header does)
ORDER_WITHOUT_GO = """
import os, sys
path, sibling, name = sys.argv[1:]
module = sys.modules['cocker'] = type(sys)('cocker')
module.__file__ = path
exec(compile(open(path, 'rb').read(), path, 'exec'), module.__dict__)
module.HOME = os.environ['COCKER_HOME']
init = module.load_cockerinit()
import _socket
sock = module.connect_unix(module.container_dir(sibling), 'monitor.sock', _socket.SOCK_SEQPACKET, 5)
sock.send(module.monitor_request(name, module.code_identity(init), None, None, []))
print(sock.recv(512).decode())
"""


def test_a_monitor_forked_for_an_order_without_go_ends_having_done_nothing(cocker, test_image,
                                                                            names, home):
    from conftest import COCKER, PYTHON
    first, second = first_booted_second_made(cocker, test_image, names, home)
    answer = subprocess.check_output(
        [PYTHON, '-I', '-S', '-c', ORDER_WITHOUT_GO, COCKER, first, second],
        env=dict(os.environ, COCKER_HOME=home)).decode().strip()
    assert answer.startswith('P'), 'the order should be taken: %r' % answer
    pid = int(answer[1:])
    wait_for(lambda: not os.path.exists('/proc/%d' % pid), what='the monitor without go to end')
    time.sleep(0.3)
    assert status_of(cocker, second) == 'STOPED'
    for left in ('pid', 'exit_status', 'cockerinit.log', 'cgroups'):
        assert not os.path.exists(container_path(home, second, left)), \
            'a monitor without go must do nothing, it made %s' % left
    assert monitors_of_home(home) == sorted(set(monitors_of_home(home)) - {pid})
    assert cocker('-a', 'run', '-c', first, '--cmd', 'true').rc == 0


def test_a_boot_served_by_a_monitor_never_loads_ctypes(cocker, test_image, names, home,
                                                       tmp_path):
    """The system calls that need ctypes (the v2 device program, the root's mount) are the
    monitor's steps: the command whose monitor a running one forks never loads it."""
    from conftest import PYTHON
    first, second = first_booted_second_made(cocker, test_image, names, home)
    python = tmp_path / 'python-verbose'            # (-v: each import on stderr, from 3.6 on)
    python.write_text('#!/bin/sh\nexec %s -v "$@"\n' % PYTHON)
    python.chmod(0o755)
    r = cocker('-d', '-a', 'boot', '-c', second, env={'COCKER_PYTHON': str(python)})
    assert r.rc == 0 and 'forked by the monitor of %s' % first in r.err, r
    imported = re.findall(r"^import '([\w.]+)' # ", r.err, re.M)
    assert 'posix' in imported and '_socket' in imported, r.err     # (the trace is there)
    assert 'ctypes' not in imported and '_ctypes' not in imported, imported
    # its monitor took the steps (the log says so) and the root is mounted
    with open(os.path.join(home, 'cocker.log')) as f:
        log = f.read()
    for step in ('restrict_container_devices', 'mount_container_root'):
        assert re.search(r'\| %d:cocker.py:\d+ \| monitor of %s: %s done$'
                         % (monitor_of(home, second), second, step), log, re.M), step
    assert mounts_of(home, second)
    assert cocker('-a', 'run', '-c', second, '--cmd', 'true').rc == 0


def test_a_failed_monitor_step_is_reported_and_undone(cocker, test_image, names, home):
    """The root's mount fails in the monitor (its overlay workdir is a file), whether a
    running monitor forked it or the command: one line, and nothing stays (cgroups, mount,
    pid files)."""
    first, second = first_booted_second_made(cocker, test_image, names, home)
    for name, forked in ((second, True), (first, False)):
        if not forked:                  # (the command forks its own)
            assert cocker('-a', 'shutdown', '-c', first).rc == 0
            with open(os.path.join(home, 'forking_monitor'), 'w'):
                pass
        workdir = container_path(home, name, 'workdir')
        shutil.rmtree(workdir)
        open(workdir, 'w').close()
        try:
            r = cocker('-d', '-a', 'boot', '-c', name)
        finally:
            os.remove(workdir)
            os.mkdir(workdir)
        assert r.rc == 255, r
        errors = [l for l in r.err.splitlines() if not l.startswith('cocker: ')]
        assert len(errors) == 1 and workdir in errors[0] and 'Traceback' not in r.err, r.err
        assert ('forked by the monitor of %s' % first in r.err) == forked, r.err
        assert status_of(cocker, name) == 'STOPED' and not mounts_of(home, name)
        for left in ('pid', 'init_pid', 'cgroups'):
            assert not os.path.exists(container_path(home, name, left)), left
        assert not [d for d in glob.glob('/sys/fs/cgroup/*/cocker/%s' % name)]
        assert cocker('-a', 'boot', '-c', name).rc == 0
        assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


def test_a_host_step_that_fails_after_the_order_leaves_no_monitor(cocker, test_image, names,
                                                                  home):
    """The order goes to the running monitor before the host steps: one that fails (a limit
    file no kernel takes) ends the monitor forked meanwhile, which did nothing.  The limit
    file is a FIFO, so the step waits until that monitor is there (else the command may end
    before the order is served, and none is forked)."""
    first, second = first_booted_second_made(cocker, test_image, names, home)
    before = monitors_of_home(home)
    limit = container_path(home, second, 'pids_limit')
    os.mkfifo(limit)
    p = cocker_process(home, '-d', '-a', 'boot', '-c', second)
    try:
        forked = lambda: len(monitors_of_home(home)) == len(before) + 1
        wait_for(forked, what='the monitor forked for the order, waiting for its go')
        with open(limit, 'w') as f:     # (the command reads it now, in its cgroup step)
            f.write('many')
        out, err = p.communicate(timeout=30)
    finally:
        unblock_reader(limit)
        p.kill()
        p.wait()
    err = err.decode()
    assert p.returncode != 0 and 'Traceback' not in err, err
    assert [l for l in err.splitlines() if not l.startswith('cocker: ')] == \
        ["*** ERROR : --pids-limit value 'many' is invalid (a number of processes, at least 1)"]
    said = lambda: re.search(r'monitor \d+ forked for %s: no go, it ends$' % second,
                             open(os.path.join(home, 'cocker.log')).read(), re.M)
    wait_for(said, what='the monitor forked for the order to end')
    wait_for(lambda: monitors_of_home(home) == before, what='that monitor to be gone')
    assert status_of(cocker, second) == 'STOPED'
    for left in ('pid', 'exit_status', 'cockerinit.log', 'cgroups'):
        assert not os.path.exists(container_path(home, second, left)), left
    os.remove(limit)
    r = cocker('-d', '-a', 'boot', '-c', second)
    assert r.rc == 0 and 'forked by the monitor of %s' % first in r.err, r


def test_a_boot_whose_command_died_after_its_go_is_not_taken_over(cocker, test_image, names,
                                                                  home):
    """The container lock goes to the monitor with the go, which lets go of it once it holds
    running.lock.  A command killed after its go (its monitor not yet running) leaves a
    container the next command must not find DEAD: it would repair it under that monitor and
    boot it again, for the first monitor to take the new host state over (and its PID 1 run
    in no cgroup once that one's teardown took the cgroups away)."""
    first, second = first_booted_second_made(cocker, test_image, names, home)
    before = set(monitors_of_home(home))
    limit = container_path(home, second, 'pids_limit')
    log_path = os.path.join(home, 'cocker.log')
    os.mkfifo(limit)
    dying = cocker_process(home, '-d', '-a', 'boot', '-c', second)
    monitor, later = None, None
    try:
        forked = lambda: set(monitors_of_home(home)) - before
        wait_for(forked, what='the monitor forked for the order')
        monitor, = forked()
        os.kill(monitor, signal.SIGSTOP)    # (its go, when sent, waits in its socket)
        with open(limit, 'w') as f:         # (the command's cgroup step goes on)
            f.write('100')
        sent = lambda: 'host side of %s complete' % second in open(log_path).read()
        wait_for(sent, what='the go sent')
        dying.kill()
        dying.wait()
        os.remove(limit)
        with open(limit, 'w') as f:
            f.write('100')
        later = cocker_process(home, '-a', 'boot', '-c', second)
        os.kill(monitor, signal.SIGCONT)
        out, err = later.communicate(timeout=30)
        assert later.returncode != 0 and b'already running' in err, (out, err)
    finally:
        unblock_reader(limit)
        if monitor is not None:
            os.kill(monitor, signal.SIGCONT)
        for p in (dying, later):
            if p is not None:
                p.kill()
                p.wait()
    assert status_of(cocker, second).startswith('RUNNING(')
    assert monitor_of(home, second) == monitor
    init_pid = int(open(container_path(home, second, 'init_pid')).read())
    cgroups = open('/proc/%d/cgroup' % init_pid).read()
    assert '/cocker/%s' % second in cgroups, cgroups
    assert not descriptors_into(monitor, os.path.join(home, 'locks')), \
        'the monitor lets go of the container lock once it runs'
    r = cocker('-a', 'run', '-c', second, '--cmd', 'cat /proc/self/cgroup')
    assert r.rc == 0 and '/cocker/%s' % second in r.out, r


@pytest.mark.parametrize('served', [False, True], ids=['own monitor', 'served'])
def test_a_boot_without_standard_input_keeps_the_monitors_descriptors_right(
        cocker, test_image, names, home, served):
    """cocker 0<&-: the first file the command opens (the container lock) would be 0, where
    the monitor puts /dev/null: the lock would be lost, and the monitor's next descriptor
    (its socket) would take 0.  The command opens /dev/null on a closed 0, 1 or 2 first."""
    first, second = first_booted_second_made(cocker, test_image, names, home, boot=served)
    p = cocker_process(home, '-d', '-a', 'boot', '-c', second, preexec_fn=lambda: os.close(0))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out == b'OK\n', (out, err)
    assert (b'forked by the monitor of %s' % first.encode() in err) == served, err
    monitor = monitor_of(home, second)
    for fd in (0, 1, 2):
        assert os.readlink('/proc/%d/fd/%d' % (monitor, fd)) == '/dev/null', fd
    assert not descriptors_into(monitor, os.path.join(home, 'locks'))
    r = cocker('-a', 'run', '-c', second, '--cmd', 'true')
    assert r.rc == 0, r


def unblock_reader(fifo):
    """A reader still blocked on that FIFO gets an end of file (nothing, if none is)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:                     # (no reader: ENXIO; or it is gone)
        pass


def test_shutdown_unmounts_a_root_in_use_or_with_a_mount_below_it(running, cocker, home):
    """The root alone goes with one umount, without reading the mount table; a root a host
    process works in is detached lazily, one with a mount below it goes with that mount:
    nothing stays mounted either way, and both boot again."""
    busy, below = running(), running()
    mount_point = container_path(home, below, 'merged', 'mnt-test')
    os.makedirs(mount_point, exist_ok=True)
    holder = subprocess.Popen(['sleep', '60'], cwd=container_path(home, busy, 'merged'))
    try:
        subprocess.check_call(['mount', '-t', 'tmpfs', 'cocker-test', mount_point])
        for name in (busy, below):
            assert cocker('-a', 'shutdown', '-c', name).out == 'OK\n'
            assert status_of(cocker, name) == 'STOPED' and not mounts_of(home, name)
        with open(os.path.join(home, 'cocker.log')) as f:
            assert '%s is busy, detaching it lazily' % container_path(home, busy, 'merged') \
                in f.read()
    finally:
        holder.kill()
        holder.wait()
        subprocess.call(['umount', mount_point], stderr=subprocess.DEVNULL)
    for name in (busy, below):
        assert cocker('-a', 'boot', '-c', name).out == 'OK\n'
        assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


def test_destroy_refuses_a_container_with_a_mount_below_it_whatever_its_name(cocker, home,
                                                                            names, test_image):
    """A mount left below a container's directory (an operator's, on a path with a space, a
    tab and a backslash, as the mount table escapes them) stops its destroy before anything
    is removed or moved, with one line naming it; once unmounted, the destroy goes through.  A
    sibling directory whose name only begins the same does not count."""
    name = names()
    assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    odd = container_path(home, name, 'x y\tz\\w')
    os.makedirs(odd)
    os.makedirs(odd + 'v')
    source = 'cocker-test-' + name
    subprocess.check_call(['mount', '-t', 'tmpfs', source, odd])
    try:
        r = cocker('-a', 'destroy', '-c', name)
        assert r.rc != 0 and 'still has mounts below it' in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r
        assert os.path.isdir(odd + 'v') and status_of(cocker, name) == 'STOPED'
    finally:                    # wherever a failed destroy may have moved it
        with open('/proc/self/mountinfo') as f:
            points = [line.split()[4] for line in f if ' - tmpfs %s ' % source in line]
        for point in points:
            subprocess.check_call(['umount', point.encode().decode('unicode_escape')])
    assert cocker('-a', 'destroy', '-c', name).out == 'OK\n'
    assert not os.path.exists(container_path(home, name))


def test_shutdown_waits_the_grace_period_for_what_ignores_sigterm_then_kills_it(running, cocker,
                                                                             home):
    """PID 1 waits for its children by their SIGCHLD (no polling): one that ends on SIGTERM
    goes at once, one that ignores it is killed once the 5 s grace period is over."""
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd', "sh -c 'trap \"\" TERM; exec sleep 600' "
               ">/dev/null 2>&1 & sleep 700 >/dev/null 2>&1 & true")
    assert r.rc == 0, r
    procs = sorted(glob.glob('/sys/fs/cgroup/*/cocker/%s/cgroup.procs' % name) +
                   glob.glob('/sys/fs/cgroup/cocker/%s/cgroup.procs' % name))[0]
    wait_for(lambda: len(open(procs).read().split()) == 3, what='PID 1 and its two sleeps')
    pids = [int(p) for p in open(procs).read().split()]
    started = time.time()
    assert cocker('-a', 'shutdown', '-c', name).out == 'OK\n'
    assert time.time() - started >= 5, 'SIGKILL came before the grace period was over'
    assert status_of(cocker, name) == 'STOPED'
    assert not [p for p in pids if os.path.exists('/proc/%d' % p)]


def test_kill_stops_at_once(running, cocker, home):
    name = running()
    assert cocker('-a', 'kill', '-c', name).out == 'OK\n'
    assert status_of(cocker, name) == 'STOPED' and not mounts_of(home, name)
    r = cocker('-a', 'kill', '-c', name)
    assert r.rc == 255 and 'not running' in r.err


def test_single_process_mode_stops_when_the_command_ends(cocker, test_image, names, home):
    name = names('sp')
    r = cocker('-a', 'create', '-m', 'test', '-c', name, '-b', '-e', 'sleep 1')
    assert r.rc == 0 and r.out == 'OK\n', r
    assert status_of(cocker, name).startswith('RUNNING(')
    wait_for(lambda: status_of(cocker, name) == 'STOPED', what='-e container to stop')
    assert not mounts_of(home, name)
    r = cocker('-a', 'boot', '-c', name, '-e', '/bin/sh -c "echo main-output; exit 4"')
    assert r.rc == 0
    wait_for(lambda: status_of(cocker, name) == 'STOPED', what='-e container to stop')
    assert 'main-output' in open(container_path(home, name, 'cockerinit.log')).read()
    assert open(container_path(home, name, 'exit_status')).read() == '4'


def test_highest_version_is_chosen_and_pinned(cocker, test_image, names, home):
    for v in ('1.9.0', '1.10.0', '1.2.0'):
        r = cocker('-a', 'install_test', '--version', v, '-f')
        assert r.rc == 0, r
        with open(os.path.join(home, 'images', 'test', v, 'rlayer', 'version.txt'), 'w') as f:
            f.write(v)
    images = cocker('-s', 'images').out
    assert [l.split()[1] for l in images.splitlines()[2:] if l.startswith('test ')] == \
        ['_', '1.2.0', '1.9.0', '1.10.0']
    name = names('ver')
    assert cocker('-a', 'create', '-m', 'test', '-c', name, '-b').rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'cat /version.txt').out == '1.10.0'
    pinned = names('pin')
    assert cocker('-a', 'create', '-m', 'test:1.2.0', '-c', pinned, '-b').rc == 0
    assert cocker('-a', 'run', '-c', pinned, '--cmd', 'cat /version.txt').out == '1.2.0'


def test_volume_is_shared_and_cannot_be_redirected_by_a_symlink(cocker, test_image, names, home,
                                                                tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir()
    decoy = tmp_path / 'decoy'
    decoy.mkdir()
    name = names('vol')
    r = cocker('-a', 'create', '-m', 'test', '-c', name, '--volume', '%s:/mnt/data' % shared,
               '--volume', '%s:/mnt/evil' % shared)
    assert r.rc == 0, r
    # the image (here: the container's upper layer) plants a symlink to a host path
    os.makedirs(container_path(home, name, 'rwlayer', 'mnt'), exist_ok=True)
    os.symlink(str(decoy), container_path(home, name, 'rwlayer', 'mnt', 'evil'))
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd', 'echo from-inside > /mnt/data/f; ls %s' % decoy)
    assert r.rc == 0, r
    assert (shared / 'f').read_text() == 'from-inside\n'
    assert 'f' in r.out.split(), 'the symlinked target must resolve inside the container'
    assert os.listdir(str(decoy)) == [], 'a bind mount escaped onto a host directory'
    assert not [l for l in open('/proc/mounts') if str(decoy) in l]
    r = cocker('-a', 'volume', '-c', name, '--volume', '/tmp:/tmp')
    assert r.rc == 255 and 'running' in r.err
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    assert cocker('-a', 'volume', '-c', name, '--volume', '%s:/data:ro' % shared).rc == 0
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /data/f; touch /data/g')
    assert r.out == 'from-inside\n' and r.rc != 0 and 'Read-only' in r.err
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    (shared / 'sub').mkdir()
    subprocess.check_call(['mount', '-t', 'tmpfs', 'cocker-test-sub', str(shared / 'sub')])
    try:
        assert cocker('-a', 'boot', '-c', name).rc == 0
        r = cocker('-a', 'run', '-c', name, '--cmd', 'touch /data/sub/x')
        assert r.rc != 0 and 'Read-only' in r.err, 'a submount of a :ro volume must be read-only'
        assert cocker('-a', 'shutdown', '-c', name).rc == 0
    finally:
        subprocess.call(['umount', str(shared / 'sub')])


def test_failed_boot_is_reported_and_undone(cocker, test_image, names, home):
    name = names('bad')
    assert cocker('-a', 'create', '-m', 'test', '-c', name, '--volume', '/nonexistent/x:/x').rc == 0
    r = cocker('-a', 'boot', '-c', name)
    assert r.rc == 255 and "volume source '/nonexistent/x' not found" in r.err, r
    assert r.err.count('\n') == 1 and 'Traceback' not in r.err
    assert status_of(cocker, name) == 'STOPED' and not mounts_of(home, name)
    other = names('bad')
    r = cocker('-a', 'create', '-m', 'test', '-c', other, '--volume', '/nonexistent/y:/y', '-b')
    assert r.rc == 255
    assert not os.path.exists(container_path(home, other)), 'create -b must roll back'


def test_wrong_states_and_bad_input_change_nothing(cocker, test_image, names, home):
    name = names('st')
    assert cocker('-a', 'create', '-m', 'test', '-c', name).rc == 0
    before = sorted(os.listdir(os.path.join(home, 'containers')))
    cases = [
        (['-a', 'run', '-c', name, '--cmd', 'true'], 255, "container '%s' is not running" % name),
        (['-a', 'shutdown', '-c', name], 255, 'not running'),
        (['-a', 'create', '-m', 'test', '-c', name], 255, "container '%s' exist" % name),
        (['-a', 'create', '-m', 'nosuchimage', '-c', 'x'], 255, "image 'nosuchimage' not found"),
        (['-a', 'create', '-m', 'test:9.9', '-c', 'x'], 255, "image 'test:9.9' not found"),
        (['-a', 'boot', '-c', 'nosuch'], 255, "container 'nosuch' not found"),
        (['-a', 'boot', '-c', '../../etc'], 7, 'invalid'),
        (['-a', 'create', '-m', 'test', '-c', 'a/b'], 7, 'invalid'),
        (['-a', 'create', '-m', '../test', '-c', 'x'], 7, 'invalid'),
        (['-a', 'create', '-m', 'test', '-c', ''], 7, 'empty'),
        (['-a', 'create', '-m', 'test', '-c', 'x' * 65], 7, 'longer'),
        (['-a', 'create', '-m', 'test', '-c', 'bell\x07'], 7, 'invalid'),
        (['-a', 'frobnicate'], 7, 'action[frobnicate] invalid'),
        (['-a', 'boot', '-c', name, '--frob'], 7, "invalid parameter '--frob'"),
        (['-a', 'boot'], 7, "expect '--container' with action '-a boot'"),
        (['-a', 'create', '-m', 'test', '-c', 'x', '--net', 'WIFI'], 7, "'--net' value[WIFI] invalid"),
    ]
    for args, rc, text in cases:
        r = cocker(*args)
        assert r.rc == rc, (args, r)
        assert r.err.startswith('*** ERROR : ') and text in r.err.splitlines()[0], (args, r)
        assert 'Traceback' not in r.err
    assert sorted(os.listdir(os.path.join(home, 'containers'))) == before
    assert not os.path.exists(os.path.join(home, 'etc'))
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'boot', '-c', name)
    assert r.rc == 255 and 'already running' in r.err
    r = cocker('-a', 'destroy', '-c', name)
    assert r.rc == 255 and '-h' in r.err and os.path.isdir(container_path(home, name))
    assert cocker('-a', 'destroy', '-c', name, '-h').out == 'OK\n'
    assert not os.path.exists(container_path(home, name))


def test_concurrent_boots_of_one_container_never_interleave(cocker, test_image, names):
    name = names('race')
    assert cocker('-a', 'create', '-m', 'test', '-c', name).rc == 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(cocker('-a', 'boot', '-c', name)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.rc for r in results) == [0, 255, 255, 255], results
    assert all('already running' in r.err for r in results if r.rc)


def test_eight_containers_created_and_booted_in_parallel(cocker, test_image, names, home):
    batch = [names('par') for _ in range(8)]
    results = {}

    def up(n):
        results[n] = cocker('-a', 'create', '-m', 'test', '-c', n, '-b')
    threads = [threading.Thread(target=up, args=(n,)) for n in batch]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results.values()), results
    for n in batch:
        assert cocker('-a', 'run', '-c', n, '--cmd', 'hostname').out == n + '\n'
    for n in batch:
        assert cocker('-a', 'destroy', '-c', n, '-h').rc == 0
    assert not [l for l in open('/proc/mounts') if os.path.join(home, 'containers') in l]


def test_debug_traces_steps_and_the_log_records_actions(cocker, test_image, names, home):
    name = names('dbg')
    r = cocker('-a', 'create', '-m', 'test', '-c', name, '-b', '-d')
    assert r.rc == 0
    # each step with the time since the command started: where a boot spends it (the
    # monitor's steps, in the log)
    assert re.search(r'^cocker: +\d+\.\d ms boot of %s: setup_cgroups done$' % name, r.err,
                     re.M), r.err
    assert 'is ready' in r.err
    log = open(os.path.join(home, 'cocker.log')).read()
    assert re.search(r'\| DEBUG \| \d+:cocker.py:\d+ \| mounted root on ', log), log
    assert re.search(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \| INFO  \| \d+:cocker.py:\d+ \| '
                     r'cocker -a create -m test -c %s -b -d' % name, log)
    assert '-a create returned 0' in log


def test_version_and_usage(cocker):
    r = cocker('-v')
    assert r.rc == 0 and re.match(r'^cocker v\d+\.\d+\.\d+ build ', r.out)
    r = cocker()
    assert r.rc == 0 and r.out.startswith('USAGE : cocker -v\n')
    assert cocker('--help').out == r.out


def test_a_container_written_by_the_c_cocker_boots(cocker, test_image, names, home):
    name = names('c')
    cp = container_path(home, name)
    for sub in ('rwlayer/etc', 'workdir', 'merged'):
        os.makedirs(os.path.join(cp, sub))
    for key, value in (('image', 'test'), ('hostname', 'legacy'), ('net', 'HOST')):
        with open(os.path.join(cp, key), 'w') as f:
            f.write(value)                      # the C cocker writes no trailing newline
    assert status_of(cocker, name) == 'STOPED'
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'hostname').out == 'legacy\n'
    versions = os.listdir(os.path.join(home, 'images', 'test'))
    highest = '1.10.0' if '1.10.0' in versions else '_'      # other tests may add versions
    assert open(os.path.join(cp, 'layers')).read() == 'test:' + highest, 'layers must be pinned'
    assert cocker('-a', 'shutdown', '-c', name).rc == 0


def test_a_boot_killed_half_way_is_repaired_by_the_next_command(cocker, test_image, names, home):
    name = names('crash')
    assert cocker('-a', 'create', '-m', 'test', '-c', name).rc == 0
    cp = container_path(home, name)
    # what a cocker killed -9 right after mounting the root leaves: the mount, a dead pid
    lower = os.path.join(home, 'images', 'test', '_', 'rlayer')
    subprocess.check_call(['mount', '-t', 'overlay', 'overlay', '-o',
                           'lowerdir=%s,upperdir=%s/rwlayer,workdir=%s/workdir' % (lower, cp, cp),
                           os.path.join(cp, 'merged')])
    dead = subprocess.Popen(['true'])
    dead.wait()
    with open(os.path.join(cp, 'pid'), 'w') as f:
        f.write(str(dead.pid))
    assert mounts_of(home, name)
    assert status_of(cocker, name) == 'STOPED'
    assert not mounts_of(home, name), '-s containers must clean the leftovers'
    assert not os.path.exists(os.path.join(cp, 'pid'))
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'true').rc == 0


def test_a_create_killed_half_way_leaves_nothing_visible(cocker, test_image, names, home):
    name = names('half')
    # a staging directory whose owner (pid 2**22+1, beyond pid_max) is gone
    staging = os.path.join(home, 'containers', '.staging', 'new.%d-1.dead' % (2 ** 22 + 1))
    os.makedirs(os.path.join(staging, 'rwlayer'))
    assert name not in cocker('-s', 'containers').out
    assert not os.path.exists(staging), 'every command must sweep what a killed create left'
    assert not os.path.exists(os.path.dirname(staging)), 'an empty .staging must go too'
    # and what a cocker 1.0 create killed half-way left (hidden beside the containers)
    legacy = os.path.join(home, 'containers', '.%s.creating.%d' % (name, 2 ** 22 + 1))
    os.makedirs(os.path.join(legacy, 'rwlayer'))
    assert cocker('-a', 'create', '-m', 'test', '-c', name).rc == 0
    assert not os.path.exists(staging), 'create must sweep what a killed create left'
    assert not os.path.exists(legacy), 'create must sweep what a killed cocker 1.0 create left'


def test_cocker_runs_as_a_program_and_as_a_plain_copy(cocker, running, names, home, tmp_path):
    import shutil
    from conftest import COCKER, COCKERINIT, PYTHON
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    shutil.copy(COCKER, str(bindir / 'cocker'))          # copied alone, without .py
    shutil.copy(COCKERINIT, str(bindir))
    env = dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON)
    env.pop('PYTHONDONTWRITEBYTECODE', None)
    for program in (COCKER, str(bindir / 'cocker')):
        out = subprocess.check_output([program, '-v'], env=env).decode()
        assert out.startswith('cocker v'), out
    assert os.listdir(str(bindir / '__pycache__')), 'the compiled form should be cached'
    sibling = running()                 # (so a monitor of the other copy's code forks)
    name = names('copy')
    p = subprocess.Popen([str(bindir / 'cocker'), '-d', '-a', 'create', '-m', 'test', '-c', name,
                          '-b', '-e', 'sleep 60'], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert out == b'OK\n', (out, err)
    assert ('forks none for %s: the command runs other code' % name).encode() in err, \
        'only a monitor of the same code may fork the monitor of a boot (%s): %s' % (sibling, err)
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /proc/1/cmdline')
    assert r.out.split('\0')[:3] == [str(bindir / 'cockerinit.py'), '--container', name], \
        'PID 1 must be the cockerinit beside the copy: %r' % r.out
    assert [f for f in os.listdir(str(bindir / '__pycache__')) if f.startswith('cockerinit.')], \
        'cockerinit should be compiled once, beside the copy'


def test_root_is_visible_from_the_host_and_the_socket_is_not_visible_inside(running, cocker, home):
    import stat
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'echo seen > /root/from-inside; find / -xdev -name "cocker.sock*" | wc -l')
    assert r.out == '0\n', 'the control socket must not be reachable inside: %r' % r.out
    root = cocker('-s', 'container_root', '-c', name).out.strip()
    assert open(os.path.join(root, 'root', 'from-inside')).read() == 'seen\n'
    sock = os.stat(container_path(home, name, 'cocker.sock'))
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == 0
    assert stat.S_IMODE(os.stat(container_path(home, name)).st_mode) == 0o700


def test_kernel_settings_stay_read_only_inside(running, cocker):
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'echo core > /proc/sys/kernel/core_pattern; echo "rc=$?"; '
               'echo h > /proc/sysrq-trigger; echo "rc=$?"; cat /proc/sys/kernel/hostname')
    assert r.out.count('rc=1') == 2, 'the container must not change the host kernel: %r' % r
    assert r.out.endswith(name + '\n')


def test_rebuilding_an_image_in_use_is_refused(running, cocker, home):
    name = running()                       # uses the highest version of 'test'
    version = open(container_path(home, name, 'layers')).read().split(':')[1]
    args = ['-a', 'install_test', '-f'] + ([] if version == '_' else ['--version', version])
    r = cocker(*args)
    assert r.rc == 255 and 'used by running container' in r.err and name in r.err, r
    assert cocker('-a', 'run', '-c', name, '--cmd', 'test -x /bin/ls').rc == 0


def test_bad_exec_quoting_is_refused_before_anything_starts(cocker, test_image, names, home):
    name = names('q')
    r = cocker('-a', 'create', '-m', 'test', '-c', name, '-b', '-e', 'sh -c "unbalanced')
    assert r.rc == 7 and "'-e' value" in r.err
    assert not os.path.exists(container_path(home, name))


def test_a_listing_to_a_reader_that_closed_ends_quietly(cocker, test_image, home):
    """cocker -s images | head -n 0: the first write finds the pipe closed; cocker ends as
    ls does, with no error line (it used to print '*** ERROR : Broken pipe', status 255)."""
    from conftest import COCKER, PYTHON
    for listing in ('images', 'containers'):
        if listing == 'containers':
            assert cocker('-a', 'create', '-m', test_image, '-c', 'pipe%s' % os.getpid()).rc == 0
        read_end, write_end = os.pipe()
        os.close(read_end)                      # a real pipe whose reader is gone
        p = subprocess.Popen([PYTHON, COCKER, '-s', listing], stdout=write_end,
                             stderr=subprocess.PIPE, env=dict(os.environ, COCKER_HOME=home))
        os.close(write_end)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 141 and err == b'', (listing, p.returncode, err)
    assert cocker('-a', 'destroy', '-c', 'pipe%s' % os.getpid()).rc == 0
