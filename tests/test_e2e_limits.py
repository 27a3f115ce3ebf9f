"""Resource limits end to end, on the host's real cgroups (v1 hierarchies or the v2 tree).

Measures come from the cgroups' own counters (CPU usage against CFS periods, pids.events,
the OOM kill), never from wall-clock timing.
"""

import glob
import json
import os
import subprocess

import pytest

from conftest import COCKER, PYTHON, container_path, load_script, wait_for

cocker_module = load_script('cocker_limits', COCKER)
CGROUP_VERSION = cocker_module.cgroup_version()


def cgroups_of(home, name):
    return open(container_path(home, name, 'cgroups')).read().split()


def cgroup_file(home, name, *candidates):
    """The first existing file among `candidates` in the container's cgroups."""
    for directory in cgroups_of(home, name):
        for filename in candidates:
            path = os.path.join(directory, filename)
            if os.path.exists(path):
                return path
    raise AssertionError('none of %s in the cgroups of %s' % (candidates, name))


def keyed(path):
    return dict((line.split()[0], int(line.split()[1])) for line in open(path) if line.strip())


def left_cgroups(name):
    """Cgroups named after the container under the cocker parents (v2 tree, v1 hierarchies)."""
    return sorted(glob.glob('/sys/fs/cgroup/cocker/' + name) +
                  glob.glob('/sys/fs/cgroup/*/cocker/' + name))


@pytest.fixture
def limited(cocker, test_image, names):
    def boot(*limits):
        name = names('lim')
        r = cocker('-a', 'create', '-m', test_image, '-c', name, '-b', *limits)
        assert r.rc == 0 and r.out == 'OK\n', r
        return name
    return boot


def test_cpus_are_the_affinity_seen_inside(limited, cocker):
    cpus = cocker_module.online_cpus()
    want = str(cpus[-1])
    name = limited('--cpus', want)
    r = cocker('-a', 'run', '-c', name, '--cmd', 'grep Cpus_allowed_list /proc/self/status')
    assert r.out.split() == ['Cpus_allowed_list:', want], r
    r = cocker('-a', 'run', '-c', name, '--cmd', 'grep Cpus_allowed_list /proc/1/status')
    assert r.out.split() == ['Cpus_allowed_list:', want], 'PID 1 is confined too'


def test_memory_limit_kills_the_hog_and_pid_1_survives(limited, cocker, home):
    name = limited('--mem-limit', '64M')
    init_pid = open(container_path(home, name, 'init_pid')).read()
    r = cocker('-a', 'run', '-c', name, '--cmd', 'dd if=/dev/zero of=/dev/null bs=200M count=1')
    assert r.rc == 137, 'dd with a 200 MB buffer is killed: %r' % (r,)
    if CGROUP_VERSION == 2:
        assert keyed(cgroup_file(home, name, 'memory.events'))['oom_kill'] >= 1
    else:
        assert keyed(cgroup_file(home, name, 'memory.oom_control'))['oom_kill'] >= 1
        limit = cgroup_file(home, name, 'memory.memsw.limit_in_bytes')
        assert open(limit).read().strip() == str(64 << 20), 'swap is limited with memory'
    assert cocker('-a', 'run', '-c', name, '--cmd', 'echo alive').out == 'alive\n'
    assert open(container_path(home, name, 'init_pid')).read() == init_pid
    assert open('/proc/%s/comm' % init_pid).read().strip() == 'cockerinit'


def cpu_counters(home, name):
    """(CPU time used in ns, CFS periods elapsed) of the container, from its cgroup."""
    if CGROUP_VERSION == 2:
        stat = keyed(cgroup_file(home, name, 'cpu.stat'))
        return stat['usage_usec'] * 1000, stat['nr_periods']
    usage = int(open(cgroup_file(home, name, 'cpuacct.usage')).read())
    return usage, keyed(cgroup_file(home, name, 'cpu.stat'))['nr_periods']


def test_cpu_quota_caps_a_busy_loop(limited, cocker, home):
    name = limited('--cpu-quota', '30%')
    used0, periods0 = cpu_counters(home, name)
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'end=$((SECONDS+3)); while [ $SECONDS -lt $end ]; do :; done')
    assert r.rc == 0, r
    used1, periods1 = cpu_counters(home, name)
    periods = periods1 - periods0
    assert periods >= 10, 'the loop ran through at least a second of CFS periods'
    share = (used1 - used0) / (periods * cocker_module.CFS_PERIOD_US * 1000.0)
    assert 0.15 < share <= 0.35, 'CPU share %.2f of one CPU under a 30%% quota' % share


def test_pids_limit_stops_a_fork_loop(limited, cocker, home):
    name = limited('--pids-limit', '20')
    # bash gives up once its forks keep failing; what matters is what the cgroup counted
    cocker('-a', 'run', '-c', name, '--cmd', 'for i in $(seq 60); do sleep 2 & done; wait')
    events = keyed(cgroup_file(home, name, 'pids.events'))
    assert events['max'] > 0, 'forks were refused at the limit'
    peak = cgroup_file(home, name, 'pids.peak', 'pids.max')
    if peak.endswith('pids.peak'):
        assert int(open(peak).read()) <= 20
    assert cocker('-a', 'run', '-c', name, '--cmd', 'echo alive').out == 'alive\n'


def test_limits_are_recorded_and_apply_again_at_the_next_boot(cocker, test_image, names, home):
    name = names('again')
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--pids-limit', '50', '--mem-limit',
               '100M')
    assert r.rc == 0, r
    for _ in range(2):
        assert cocker('-a', 'boot', '-c', name).rc == 0
        assert open(cgroup_file(home, name, 'pids.max')).read().strip() == '50'
        mem = cgroup_file(home, name, 'memory.max', 'memory.limit_in_bytes')
        assert open(mem).read().strip() == str(100 << 20)
        assert cocker('-a', 'shutdown', '-c', name).rc == 0
    # new values replace the recorded ones; 'none' drops one
    assert cocker('-a', 'boot', '-c', name, '--pids-limit', '70', '--mem-limit', 'none').rc == 0
    assert open(cgroup_file(home, name, 'pids.max')).read().strip() == '70'
    value = open(cgroup_file(home, name, 'memory.max', 'memory.limit_in_bytes')).read().strip()
    assert value == 'max' or int(value) > 1 << 40, 'no memory limit any more'
    lines = cocker('-s', 'container_limits', '-c', name).out.splitlines()
    assert lines[0].split() == ['container_id', 'cpus', 'cpu_quota', 'mem_limit', 'pids_limit',
                                'mem_usage', 'pids']
    row = lines[2].split()
    assert row[:5] == [name, '-', '-', '-', '70'] and row[-1].isdigit(), lines


@pytest.mark.parametrize('how', ['shutdown', 'kill -9 PID 1', 'kill -9 monitor'])
def test_cgroups_are_removed_however_the_container_stops(how, limited, cocker, home):
    name = limited('--cpus', '0', '--cpu-quota', '50%', '--mem-limit', '64M', '--pids-limit', '30')
    dirs = cgroups_of(home, name)
    assert len(dirs) >= (1 if CGROUP_VERSION == 2 else 4) and all(map(os.path.isdir, dirs))
    assert left_cgroups(name) == sorted(dirs)
    if how == 'shutdown':
        assert cocker('-a', 'shutdown', '-c', name).rc == 0
    else:
        pid = open(container_path(home, name, 'init_pid' if 'PID 1' in how else 'pid')).read()
        os.kill(int(pid), 9)
        if 'PID 1' in how:
            wait_for(lambda: not os.path.exists(container_path(home, name, 'pid')),
                     what='the monitor to clean up')      # (its pid file goes last)
        else:
            wait_for(lambda: not os.path.exists('/proc/%s' % pid), what='the monitor to die')
            assert cocker('-s', 'containers').rc == 0
    assert left_cgroups(name) == [] and not os.path.exists(container_path(home, name, 'cgroups'))


def born_in_cgroup2_expected(dirs):
    """Whether PID 1 should be born in its cgroup2 directory (clone3 into a cgroup): Linux
    5.7, Python 3.7 (the fork hooks cocker calls around it), and a v2 directory."""
    python = subprocess.check_output([PYTHON, '-c',
                                      'import sys; print(sys.hexversion >= 0x3070000)'])
    kernel = tuple(int(x) for x in os.uname().release.split('-')[0].split('.')[:2])
    return python.strip() == b'True' and kernel >= (5, 7) and \
        any(cocker_module.is_cgroup2(d) for d in dirs)


def in_cgroups(text, name):
    """The lines of a /proc/PID/cgroup text that name the container's cgroups."""
    return sorted(line for line in text.splitlines() if line.endswith(':/cocker/' + name))


def test_pid1_and_its_processes_are_in_every_cgroup_and_the_monitor_in_none(cocker, home,
                                                                            test_image, names):
    """PID 1 is in each of the container's cgroups before its first step, however it got
    there (born in the v2 one and joining the v1 ones itself, or moved by its monitor), and
    so are the main process, a session and a restarted PID 1; the monitor stays the host's."""
    name = names('cg')
    r = cocker('-d', '-a', 'create', '-m', test_image, '-c', name, '-b', '-e', 'sleep 600',
               '--restart', 'always')
    assert r.rc == 0, r
    dirs = cgroups_of(home, name)
    assert len(dirs) >= (1 if CGROUP_VERSION == 2 else 4), dirs
    with open(os.path.join(home, 'cocker.log')) as f:
        lines = [line for line in f if 'PID 1 of %s:' % name in line and 'step' not in line]
    born = [line for line in lines if 'born in its cgroup2 directory' in line]
    assert len(lines) == 1 and bool(born) == born_in_cgroup2_expected(dirs), lines
    init_pid = open(container_path(home, name, 'init_pid')).read()
    entries = in_cgroups(open('/proc/%s/cgroup' % init_pid).read(), name)
    assert len(entries) == len(dirs), (entries, dirs)
    monitor = open(container_path(home, name, 'pid')).read()
    assert in_cgroups(open('/proc/%s/cgroup' % monitor).read(), name) == []

    def main_process():         # (forked by cockerinit, it is 'sleep' once it has exec'd)
        children = open('/proc/%s/task/%s/children' % (init_pid, init_pid)).read().split()
        return [pid for pid in children if open('/proc/%s/comm' % pid).read() == 'sleep\n']
    wait_for(lambda: len(main_process()) == 1, what='the main process, sleep')
    main = main_process()
    assert in_cgroups(open('/proc/%s/cgroup' % main[0]).read(), name) == entries
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /proc/self/cgroup')
    assert r.rc == 0 and in_cgroups(r.out, name) == entries, r
    os.kill(int(init_pid), 9)           # the restart policy brings PID 1 back
    path = container_path(home, name, 'init_pid')
    wait_for(lambda: os.path.exists(path) and open(path).read() not in ('', init_pid),
             what='PID 1 to restart')
    again = open(path).read()
    assert in_cgroups(open('/proc/%s/cgroup' % again).read(), name) == entries
    assert cocker('-a', 'shutdown', '-c', name).rc == 0


def test_a_process_left_in_a_cgroup_is_killed_and_reported(limited, cocker, home):
    name = limited('--pids-limit', '30')
    stray = subprocess.Popen(['sleep', '300'])
    try:
        with open(os.path.join(cgroup_file(home, name, 'pids.max').rsplit('/', 1)[0],
                               'cgroup.procs'), 'w') as f:
            f.write(str(stray.pid))
        assert cocker('-a', 'shutdown', '-c', name).rc == 0
        assert stray.wait(timeout=10) == -9
        assert left_cgroups(name) == []
        assert 'process %d was still in' % stray.pid in open(os.path.join(home, 'cocker.log')).read()
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_bad_limit_values_are_refused_before_anything_starts(cocker, test_image, names, home):
    name = names('badlim')
    assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    beyond = str(max(cocker_module.online_cpus()) + 1)
    for option, value, text in [
            ('--cpus', beyond, "this host has no CPU %s" % beyond),
            ('--cpus', '1-0', 'is invalid'), ('--cpus', 'all', 'is invalid'),
            ('--cpu-quota', '0%', 'out of range'), ('--cpu-quota', '30', 'is invalid'),
            ('--cpu-quota', '-5%', 'is invalid'), ('--cpu-quota', '100000%', 'out of range'),
            ('--mem-limit', '-1M', 'is invalid'), ('--mem-limit', '12Q', 'is invalid'),
            ('--mem-limit', '1K', 'too small'), ('--mem-limit', '', 'is invalid'),
            ('--pids-limit', '0', 'is invalid'), ('--pids-limit', 'ten', 'is invalid')]:
        r = cocker('-a', 'boot', '-c', name, option, value)
        assert r.rc == 7 and text in r.err and r.err.count('\n') == 1, (option, value, r)
        assert not os.path.exists(container_path(home, name, 'pid'))
        assert not os.path.exists(container_path(home, name, option[2:].replace('-', '_')))
    r = cocker('-a', 'create', '-m', test_image, '-c', names('badlim'), '-b', '--cpus', beyond)
    assert r.rc == 7


def test_cgroup_v2_host(cocker, test_image, names, home, not_run):
    """The real v2 path, where this host has a unified tree with the controllers."""
    def skip(reason):
        not_run('the cgroup v2 limits end to end (test_cgroup_v2_host): %s' % reason)
        pytest.skip(reason)
    if CGROUP_VERSION != 2:
        skip('this host has cgroup v1 hierarchies (/sys/fs/cgroup/cgroup.controllers '
             'missing); the v2 path is covered by the unit tests on a fake tree')
    available = open('/sys/fs/cgroup/cgroup.controllers').read().split()
    if not {'cpu', 'memory', 'pids'} <= set(available):
        skip('the v2 tree lacks cpu, memory or pids: %s' % available)
    name = names('v2')
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '-b', '--cpu-quota', '25%',
               '--mem-limit', '64M', '--pids-limit', '20')
    assert r.rc == 0, r
    base = '/sys/fs/cgroup/cocker/' + name
    assert cgroups_of(home, name) == [base]
    assert open(base + '/cpu.max').read().split() == ['25000', '100000']
    assert open(base + '/memory.max').read().strip() == str(64 << 20)
    assert open(base + '/pids.max').read().strip() == '20'
    init_pid = open(container_path(home, name, 'init_pid')).read()
    assert open('/proc/%s/cgroup' % init_pid).read().strip() == '0::/cocker/' + name
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    assert not os.path.exists(base)


def test_a_cgroup_file_the_kernel_lacks_is_skipped_on_the_real_cgroupfs():
    """cgroupfs refuses to create a file with EACCES: cocker must see ENOENT to fall back
    (a missing memory.memsw.* or memory.swap.max is no error).  A directory of the host's
    own hierarchy, removed again."""
    hierarchy = '/sys/fs/cgroup/memory'
    if not os.path.isdir(hierarchy):
        hierarchy = '/sys/fs/cgroup'
    directory = os.path.join(hierarchy, 'cocker-unit-%d' % os.getpid())
    os.mkdir(directory)
    try:
        cocker_module.write_cgroup_file(directory, 'memory.swap.max' if 'memory' in hierarchy else
                                 'memory.memsw.limit_in_bytes', '0')
        with pytest.raises(cocker_module.CockerError) as e:
            cocker_module.write_cgroup_file(directory, 'memory.no_such_file', '0')
        assert 'does not exist' in e.value.message
    finally:
        os.rmdir(directory)
