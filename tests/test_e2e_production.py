"""Containers as production virtual hosts: restart policies, autostart after a host boot,
shutdown of everything before a halt."""

import os
import signal
import subprocess
import time

from conftest import container_path, wait_for


def status_of(cocker, name):
    for line in cocker('-s', 'containers').out.splitlines()[2:]:
        if line.split()[0] == name:
            return line.split()[-1].split('(')[0]
    return None


def attr(home, name, key):
    try:
        return open(container_path(home, name, key)).read().strip()
    except FileNotFoundError:
        return None


def test_on_failure_restarts_up_to_its_maximum(cocker, test_image, names, home):
    name = names('of')
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--restart', 'on-failure:2', '-b',
               '-e', "sh -c 'echo ran; exit 1'")
    assert r.rc == 0, r
    wait_for(lambda: status_of(cocker, name) == 'STOPED' and attr(home, name, 'restart_count')
             == '2', timeout=20, what='two restarts, then stopped')
    time.sleep(1)
    assert status_of(cocker, name) == 'STOPED' and attr(home, name, 'restart_count') == '2'
    assert attr(home, name, 'exit_status') == '1'
    log = open(container_path(home, name, 'cockerinit.log')).read()
    assert log.count('ran\n') == 3, 'the first run and two restarts'
    # a main process that succeeds is not restarted by on-failure
    assert cocker('-a', 'update', '-c', name, '--restart', 'on-failure').rc == 0
    assert cocker('-a', 'boot', '-c', name, '-e', 'true').rc == 0
    wait_for(lambda: status_of(cocker, name) == 'STOPED', what='the end of true')
    time.sleep(0.5)
    assert attr(home, name, 'restart_count') is None, 'a boot counts anew; true is no failure'


def test_always_survives_a_kill_9_of_pid_1_but_not_a_shutdown(cocker, test_image, names,
                                                              home):
    name = names('al')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--restart', 'always',
                  '-b').rc == 0
    first = int(attr(home, name, 'init_pid'))
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: attr(home, name, 'restart_count') == '1' and attr(home, name, 'init_pid')
             not in (None, str(first)), what='a new PID 1')
    wait_for(lambda: cocker('-a', 'run', '-c', name, '--cmd', 'echo up').out == 'up\n',
             what='the restarted container to serve')
    assert status_of(cocker, name) == 'RUNNING'
    r = cocker('-a', 'update', '-c', name, '--restart', 'no')
    assert r.rc == 255 and 'running' in r.err, 'update changes only a stopped container'
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    time.sleep(1.5)
    assert status_of(cocker, name) == 'STOPED', 'a shutdown is never undone by the policy'
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'kill', '-c', name).rc == 0
    time.sleep(1.5)
    assert status_of(cocker, name) == 'STOPED', 'nor a kill'


def test_bad_restart_and_autostart_values_are_usage_errors(cocker, test_image, names):
    for args in (['--restart', 'sometimes'], ['--restart', 'on-failure:x'],
                 ['--restart', 'always:3'], ['--autostart-delay', '-1'],
                 ['--autostart', '99999999999']):
        r = cocker('-a', 'create', '-m', test_image, '-c', names('bad'), *args)
        assert r.rc == 7 and len(r.err.splitlines()) == 1, (args, r)


def simulate_host_reboot(home, names_):
    """What a host reboot leaves of running containers: their state files, nothing the
    kernel held (processes, mounts, network namespaces, cgroups)."""
    for name in names_:
        for key in ('pid', 'init_pid'):
            pid = attr(home, name, key)
            if pid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for name in names_:
        wait_for(lambda: not os.path.exists('/proc/%s' % attr(home, name, 'pid')),
                 what='the monitor of %s to be gone' % name)
        merged = container_path(home, name, 'merged')
        while subprocess.call(['umount', '-l', merged], stderr=subprocess.DEVNULL) == 0:
            pass
        for line in open(container_path(home, name, 'cgroups')).read().split():
            if os.path.isdir(line):
                os.rmdir(line)


def test_a_host_reboot_brings_back_exactly_the_marked_containers_in_order(
        cocker, test_image, names, home):
    low, high, mid, unmarked = names('lo'), names('hi'), names('mi'), names('un')
    for name, extra in ((low, ['--autostart']), (high, ['--autostart', '20']),
                        (mid, ['--autostart', '5', '--autostart-delay', '1']),
                        (unmarked, [])):
        assert cocker('-a', 'create', '-m', test_image, '-c', name, '-b', *extra).rc == 0
    simulate_host_reboot(home, [low, high, mid, unmarked])
    start = time.time()
    r = cocker('-a', 'autostart')
    assert r.rc == 0, r
    booted = [line.split(':')[0] for line in r.out.splitlines()]
    assert [n for n in booted if n in (low, high, mid, unmarked)] == [high, mid, low], \
        'the highest priority first: %r' % booted
    assert time.time() - start >= 1, 'the delay after mid'
    for name in (low, high, mid):
        assert status_of(cocker, name) == 'RUNNING'
        assert cocker('-a', 'run', '-c', name, '--cmd', 'echo $((1+1))').out == '2\n'
    assert status_of(cocker, unmarked) == 'STOPED'
    assert cocker('-a', 'update', '-c', unmarked, '--autostart', '1').rc == 0
    r = cocker('-a', 'autostart')
    assert r.rc == 0 and [l.split(':')[0] for l in r.out.splitlines()
                          if l.split(':')[0] in (low, high, mid, unmarked)] == [unmarked], r
    # before a halt: everything down
    r = cocker('-a', 'shutdown_all')
    assert r.rc == 0, r
    for name in (low, high, mid, unmarked):
        assert status_of(cocker, name) == 'STOPED'
    assert cocker('-a', 'update', '-c', low, '--autostart', 'off').rc == 0
    assert attr(home, low, 'autostart') is None
