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
    assert attr(home, name, 'init_pid') is None, 'no pid of a process that is gone'
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


def test_json_listings_say_what_the_text_listings_say(cocker, test_image, names, home):
    import json
    name = names('js')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--mem-limit', '64M',
                  '--restart', 'on-failure:3', '--autostart', '7', '--volume', '/tmp:/mnt:ro',
                  '-b').rc == 0
    text = [l.split() for l in cocker('-s', 'containers').out.splitlines()[2:]]
    records = json.loads(cocker('-s', 'containers', '--format', 'json').out)
    assert sorted(r['name'] for r in records) == sorted(row[0] for row in text)
    mine = [r for r in records if r['name'] == name][0]
    row = [row for row in text if row[0] == name][0]
    assert row[-1] == 'RUNNING(%d)' % mine['pid'] and mine['state'] == 'running'
    assert (mine['image'], mine['hostname'], mine['net']) == tuple(row[1:4])
    images = json.loads(cocker('-s', 'images', '--format', 'json').out)
    text = [l.split() for l in cocker('-s', 'images').out.splitlines()[2:]]
    assert [(i['name'], i['version']) for i in images] == [tuple(t[:2]) for t in text]
    assert all(isinstance(i['size'], int) and i['modified'].endswith('Z') for i in images)
    limits = [r for r in json.loads(cocker('-s', 'container_limits', '--format', 'json').out)
              if r['name'] == name][0]
    assert limits['mem_limit'] == 64 << 20 and limits['pids_limit'] == 4096 and \
        isinstance(limits['mem_usage'], int)
    inspected = json.loads(cocker('-s', 'inspect', '-c', name).out)
    assert inspected['restart'] == {'policy': 'on-failure', 'maximum': 3, 'count': 0}
    assert inspected['autostart'] == {'priority': 7, 'delay': 0}
    assert inspected['volumes'] == [{'host': '/tmp', 'container': '/mnt', 'read_only': True}]
    assert inspected['network']['model'] == 'HOST' and inspected['init_pid'] == int(
        open(container_path(home, name, 'init_pid')).read())
    assert inspected['layers'] and all(os.path.isdir(p) for p in inspected['layers'])
    stats = json.loads(cocker('-s', 'stats', '-c', name, '--format', 'json').out)
    assert stats[0]['name'] == name and stats[0]['cpu_percent'] is not None
    assert cocker('-s', 'images', '--format', 'yaml').rc == 7
    assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0


def test_logs_are_capped_and_followed(cocker, test_image, names, home):
    from conftest import cocker_process
    name = names('lg')
    # about 200 MB of output; at most 1 MiB in each of the current file and 2 rotated ones
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--log-size', '1M',
               '--log-count', '2', '-b', '-e',
               "sh -c 'yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789 | head -c 200000000;"
               " echo; echo done'")
    assert r.rc == 0, r
    wait_for(lambda: status_of(cocker, name) == 'STOPED', timeout=180, what='200 MB written')
    files = [f for f in os.listdir(container_path(home, name)) if f.startswith('cockerinit.log')]
    assert sorted(files) == ['cockerinit.log', 'cockerinit.log.1', 'cockerinit.log.2'], files
    assert sum(os.path.getsize(container_path(home, name, f)) for f in files) <= 3 << 20
    r = cocker('-s', 'logs', '-c', name, '--tail', '2')
    assert r.rc == 0 and r.out.splitlines()[0] == 'done', r.out[-300:]
    assert cocker('-s', 'logs', '-c', name, '--tail', '0').out == ''
    # --follow: the lines as they come, and its end with the container's
    assert cocker('-a', 'boot', '-c', name, '-e',
                  "sh -c 'echo one; sleep 2; echo two; sleep 1'").rc == 0
    follow = cocker_process(home, '-s', 'logs', '-c', name, '--follow')
    try:
        import select
        seen = b''
        deadline = time.time() + 20
        while b'one\n' not in seen and time.time() < deadline:
            if select.select([follow.stdout], [], [], 0.5)[0]:
                seen += os.read(follow.stdout.fileno(), 65536)
        assert b'one\n' in seen and b'two\n' not in seen, 'one, while two is still to come'
        out, err = follow.communicate(timeout=30)
        assert follow.returncode == 0 and b'two\n' in seen + out, err
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert cocker('-a', 'destroy', '-c', name).rc == 0


def test_a_fuller_run(cocker, test_image, names, home, terminal):
    name = names('fr')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '-b').rc == 0
    r = cocker('-a', 'run', '-c', name, '-u', 'nobody', '-w', '/tmp', '--env', 'A=1',
               '--env', 'B=two words', '--cmd', 'echo $A $B $(pwd) $(id -u)')
    assert r.rc == 0 and r.out == '1 two words /tmp 65534\n', r
    r = cocker('-a', 'run', '-c', name, '-w', '/no/such/dir', '--cmd', 'pwd')
    assert r.rc == 127 and 'cannot change to /no/such/dir' in r.err, r
    r = cocker('-a', 'run', '-c', name, '-w', 'relative', '--cmd', 'pwd')
    assert r.rc == 7, r
    # -t: a pty of the container, the window size of the caller's terminal
    t = terminal('-a', 'run', '-c', name, '-t', '--cmd', 'tty; stty size; exit 3',
                 rows=30, cols=100)
    text = t.expect('30 100')
    assert t.wait() == 3 and '/dev/pts/' in text, text
    r = cocker('-a', 'run', '-c', name, '-t', '--cmd', 'true')
    assert r.rc == 255 and 'needs a terminal' in r.err
    assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0


def test_a_one_shot_run_passes_stdio_and_status_and_leaves_nothing(cocker, test_image, names,
                                                                   home, terminal):
    from conftest import cocker_process
    before = sorted(os.listdir(os.path.join(home, 'containers')))
    r = cocker('-a', 'create', '-m', test_image, '-b', '--rm', '-e',
               "sh -c 'echo out; echo err >&2; exit 7'")
    assert (r.rc, r.out, r.err) == (7, 'out\n', 'err\n'), r
    r = cocker('-a', 'create', '-m', test_image, '-c', names('os'), '-b', '--rm', '-i', '-e',
               "sh -c 'tr a-z A-Z; echo end'", input=b'some input\n')
    assert (r.rc, r.out) == (0, 'SOME INPUT\nend\n'), r
    r = cocker('-a', 'create', '-m', test_image, '--rm', '-e', 'true')
    assert r.rc == 7 and '-b' in r.err, 'a one-shot needs -b'
    assert sorted(os.listdir(os.path.join(home, 'containers'))) == before
    # -t: the command's stdio is a terminal
    t = terminal('-a', 'create', '-m', test_image, '-b', '-t', '--rm', '-e',
                 "sh -c 'test -t 0 && test -t 1 && echo on-a-terminal; exit 4'")
    assert 'on-a-terminal' in t.expect('on-a-terminal') and t.wait() == 4
    # interrupted (Ctrl-C): the container goes at once; killed: the next command removes it
    for sig, name in ((signal.SIGINT, names('int')), (signal.SIGKILL, names('kil'))):
        p = cocker_process(home, '-a', 'create', '-m', test_image, '-c', name, '-b', '--rm',
                           '-e', 'sleep 1000')
        wait_for(lambda: status_of(cocker, name) == 'RUNNING', what='the one-shot to run')
        p.send_signal(sig)
        p.communicate(timeout=60)
        if sig == signal.SIGKILL:
            assert os.path.isdir(container_path(home, name)), 'killed: nothing could clean up'
            cocker('-s', 'images')
        assert not os.path.exists(container_path(home, name)), sig
    assert sorted(os.listdir(os.path.join(home, 'containers'))) == before
    assert os.listdir(os.path.join(home, 'oneshot')) == []
