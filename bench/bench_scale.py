"""Scale benchmark of cocker: many idle containers on one host; whether boot, the listing
and destroy stay flat as their number grows, what one costs in memory, and whether the
commands stay correct when many of them run at once.

What is measured (wall-clock time of each command, a fresh process started with
subprocess, time.perf_counter, stdin /dev/null, stdout and stderr piped, or written to
temporary files in the concurrency phase):

    create, boot HOST         -a create -m test -c NAME --net HOST of --host N containers
                              (default 1000), then -a boot -c NAME of each, one after
                              another, each timed; the median of the first 10, of the last
                              10, and last / first, the one with the most containers over
                              the one with the fewest (boot: target <= 1.2, i.e. no boot
                              scans every container or mount; create: for information)
    create, boot BRIDGE       the same for --bridge N containers (default 0; the issue's
                              figure is 500), --net BRIDGE with one port mapping each,
                              created and booted after the HOST ones, on a bridge and a
                              10.x.0.0/16 of this run's own (network.conf, as in
                              bench_network.py): flat also means no boot reads every
                              iptables rule
    python -c pass beside     `python -c pass` run just before each of those boots, with
    each boot                 its first 10 / last 10 medians and their ratio, and the
                              boot's ratio once divided by it: how much of a boot's growth
                              is the host's, not cocker's (a host whose kernel works per
                              process, as DAMON's sampling of shared pages, slows every
                              program as containers are added); for information
    host CPU, all idle        with all running: the share of the CPUs busy over 5 s
                              (/proc/stat) and the busiest process then (/proc/PID/stat),
                              for information
    PSS per container         the proportional set size of a container's monitor (its pid
                              file) plus its PID 1 (init_pid), the Pss: line of
                              /proc/PID/smaps_rollup, when 100 containers run (target <= 6 MB,
                              MB = 2^20 bytes) and again with all running; the median over
                              the containers, and of the monitor and PID 1 alone
    -s containers             with all running, median of 5 (target <= 250 ms at 1000); the
                              table must have one line per container, each RUNNING(pid), and
                              -s containers --format json (timed too) must parse with
                              json.loads into one entry per container, each running
    concurrency               --concurrent C commands (default 50) started at once with
                              subprocess.Popen, in turn: -s containers; -a shutdown -c X,
                              followed as soon as it ends by -a boot -c X; -a destroy -c Y
                              -h (X and Y distinct containers spread over all of the run's).
                              Every command must exit 0, every listing among them show each
                              container not touched RUNNING and no name twice, and the
                              listing after them exactly the containers not destroyed, each
                              RUNNING.  Their wall-clock time and the slowest command are
                              given for information
    destroy HOST, BRIDGE      -a destroy -c NAME -h of every container left (running), one
                              after another, HOST ones first, in creation order; median of
                              the first 10, of the last 10, and first / last, as the first
                              run with the most containers (target <= 1.2); -s containers
                              must then list none.  Beside each: python -c pass, as beside
                              the boots, and what the host read from its disks meanwhile
                              (/proc/vmstat pgpgin), median KB of the first 10 and the last
                              10: a host that evicts the files of idle processes from the
                              page cache (a DAMON pageout scheme) makes a destroy of a
                              container idle for long read its files back
    boot profile              10 containers of each net each created, booted under -d and
                              destroyed, before any other is made (one more running
                              meanwhile, whose monitor forks theirs) and again with all
                              running: when each step of the boot was done (its records in
                              cocker.log: the CLI's, the monitor's, PID 1's), in ms since
                              the command's first record, median of each, and the growth:
                              where a boot's time goes as containers are added
    destroy, fresh            10 HOST containers each created, booted and destroyed at
                              once, before the destroys with all running and after them
                              with none: the destroy's growth with its files cached (target
                              <= 1.2)

The report is a table (measure, median, target, OK or MISSED).  A time above its target is
only marked MISSED; a correctness check that fails (a command of the concurrency phase, a
listing) is MISSED too, with what was wrong on stderr, and makes the exit status 1, as any
step that fails does.  Before each boot /proc/meminfo's MemAvailable must be above 1 GB, or
the run stops with an error rather than push the host into the OOM killer.

cocker runs with a real interpreter, as in bench.py (--python PATH, else $COCKER_PYTHON,
else the interpreter running this script), installed as operators do in a temporary
COCKER_HOME (/tmp/cocker-bench-scale-*) with -a install_test; /var/cocker is never
touched.  Container names carry a token of the run (sc<6 hex digits>h0000, ...b0000), as
cocker's cgroups are named after containers host-wide.  At the end, pass or fail, also on
SIGTERM or ^C (the cleanup itself ignores both), every container made is destroyed (-a
destroy -c NAME -h -f), the bridge removed (-a del_bridge) when BRIDGE was used, then the
home; the run fails loudly (exit status 2) if a process, a mount, a cgroup, a netns, a link
or an iptables rule of it is left.  Netns, links and rules are compared with those before
the run, as bench_network.py does; a new one that names nothing of this run (its bridge,
subnet or containers' netns) is only noted, as another run on the host may have made it.

    sudo /usr/bin/python3 bench/bench_scale.py                       (1000 HOST)
    sudo /usr/bin/python3 bench/bench_scale.py --bridge 500          (the issue's figures)
    sudo /usr/bin/python3 bench/bench_scale.py --host 30 --concurrent 10    (a quick look)

Runs under Python 3.6 and newer.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (BenchError, bench_home, cgroup_hierarchies, command_text,  # noqa: E402
                   last_line, median, mounts_under, launch, PYTHON_HELP, process_stat,
                   processes_using, python_version, remove_cgroup, remove_home, run_checked,
                   run_quietly)
from bench_network import free_subnet, network_objects  # noqa: E402

NETS = ('HOST', 'BRIDGE')
FLAT_WINDOW = 10                #: boots (creates, destroys) compared at each end
FLAT_TARGET = 1.2               #: the end with the most containers / the one with fewest
PSS_AT = 100                    #: running containers when PSS is measured (the issue's)
PSS_TARGET_MB = 6.0             #: monitor + PID 1 of one idle container
LISTING_REPEAT = 5
LISTING_TARGET_MS = 250         #: -s containers (the issue's figure is at 1000 running)
IDLE_SECONDS = 5                #: the host's CPU load, all containers idle
MIN_AVAILABLE_MB = 1024         #: below this MemAvailable no further container is booted
PORT_BASE = 40000               #: BRIDGE host ports: PORT_BASE + pid % 10000 + number
CGROUP_PARENT = 'cocker'        #: cocker's cgroups: HIERARCHY/cocker/CONTAINER
COMMAND_TIMEOUT = 120           #: seconds an interrupted command is given to finish
#: a boot's milestones, as its -d records in cocker.log say (the container's name in %s)
BOOT_STEPS = (
    ('boot of %s: setup_network done', 'host step 1: the network'),
    ('boot of %s: setup_cgroups done', 'host step 2: the cgroups'),
    ('monitor of %s: set up', 'monitor set up (devices, root mounted)'),
    ('PID 1 of %s: step 1 done', 'PID 1 born, its step 1 done'),
    ('PID 1 of %s: step 2 done', 'step 2: the network namespace'),
    ('PID 1 of %s: step 3 done', 'step 3: mount, UTS and IPC namespaces'),
    ('PID 1 of %s: step 8 done', 'steps 4-8: hostname, volumes, /proc, /sys, /dev'),
    ('cockerinit of %s is ready', 'READY (cockerinit pivoted, confined, started)'),
)


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------

def pss_kb(pid):
    """The Pss: of a process in kB, from /proc/PID/smaps_rollup (the sum over
    /proc/PID/smaps where the kernel has no rollup)."""
    for path in ('/proc/%d/smaps_rollup' % pid, '/proc/%d/smaps' % pid):
        try:
            with open(path) as f:
                return sum(int(line.split()[1]) for line in f if line.startswith('Pss:'))
        except FileNotFoundError:
            if not os.path.isdir('/proc/%d' % pid):
                break
        except OSError as e:
            raise BenchError('reading %s: %s' % (path, e))
    raise BenchError('process %d is gone: its Pss cannot be read' % pid)


def available_mb():
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) // 1024
    return None


def disk_read_kb():
    """KB the host has read from its block devices since its boot (/proc/vmstat pgpgin)."""
    with open('/proc/vmstat') as f:
        for line in f:
            if line.startswith('pgpgin '):
                return int(line.split()[1])
    return 0


def read_number(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Listings
# ---------------------------------------------------------------------------------------

def listing_rows(out):
    """(name, status) of each row of -s containers' table, after its header and rule."""
    lines = [line for line in out.splitlines() if line.strip()]
    if lines and lines[0].split()[0] == 'container_id':
        lines = lines[1:]
    if lines and set(lines[0].strip()) == {'-'}:
        lines = lines[1:]
    return [(line.split()[0], line.split()[-1]) for line in lines]


def json_rows(out):
    """(name, status) of each entry of -s containers --format json, the status written as
    the table writes it (RUNNING(pid), STOPED)."""
    try:
        entries = json.loads(out)
    except ValueError as e:
        return None, ['--format json output does not parse: %s' % e]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None, ['--format json output is not an array of objects']
    rows = []
    for entry in entries:
        running = entry.get('state') == 'running' and entry.get('pid')
        rows.append((entry.get('name'), 'RUNNING(%s)' % entry['pid'] if running
                     else str(entry.get('state'))))
    return rows, []


def listing_problems(rows, running, may_exist=()):
    """What is wrong with a listing that must show each of running as RUNNING, may show
    those of may_exist in any state, and nothing else, each name once."""
    problems = []
    counts = {}
    for name, _ in rows:
        counts[name] = counts.get(name, 0) + 1
    problems += ['%s listed %d times' % (name, n) for name, n in sorted(counts.items()) if n > 1]
    problems += ['%s listed, but it should not exist' % name
                 for name in sorted(set(counts) - set(running) - set(may_exist))]
    status = dict(rows)
    for name in sorted(running):
        if name not in status:
            problems.append('%s not listed' % name)
        elif not status[name].startswith('RUNNING('):
            problems.append('%s listed as %s, not RUNNING' % (name, status[name]))
    return problems


# ---------------------------------------------------------------------------------------
# Commands at once
# ---------------------------------------------------------------------------------------

def start_command(argv, env):
    """Popen argv, its stdout and stderr to temporary files: a pipe read only at the end
    would stall a listing longer than the pipe's buffer."""
    out, err = tempfile.TemporaryFile(mode='w+'), tempfile.TemporaryFile(mode='w+')
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, universal_newlines=True)
    except BaseException:
        out.close()
        err.close()
        raise
    return {'argv': argv, 'proc': proc, 'out': out, 'err': err, 'start': time.perf_counter()}


def finish_command(command):
    """Once its process has ended: its time, exit status, stdout and stderr."""
    command['seconds'] = time.perf_counter() - command['start']
    command['status'] = command['proc'].returncode
    for key in ('out', 'err'):
        f = command[key]
        f.seek(0)
        command[key] = f.read()
        f.close()


def wait_or_kill(command):
    """An interrupted run: let the command finish, so that the cleanup does not race it
    (as run_checked does); kill it if it hangs."""
    try:
        command['proc'].wait(timeout=COMMAND_TIMEOUT)
    except BaseException:
        command['proc'].kill()
        command['proc'].wait()
    for key in ('out', 'err'):
        if hasattr(command[key], 'close'):
            command[key].close()


def run_at_once(sequences, env):
    """Start the first command of every sequence at once; when one ends with status 0 the
    next of its sequence starts.  Return (wall-clock seconds, the finished commands, in
    the order they ended)."""
    queues = [list(sequence) for sequence in sequences]
    active = {}
    finished = []
    start = time.perf_counter()
    try:
        for i, queue in enumerate(queues):
            active[i] = start_command(queue.pop(0), env)
        while active:
            time.sleep(0.005)
            for i in sorted(active):
                command = active[i]
                if command['proc'].poll() is None:
                    continue
                finish_command(command)
                finished.append(command)
                del active[i]
                if queues[i] and command['status'] == 0:
                    active[i] = start_command(queues[i].pop(0), env)
    except BaseException:
        for command in active.values():
            wait_or_kill(command)
        raise
    return time.perf_counter() - start, finished


def spread(names, count):
    """count of names, evenly spaced over them (distinct while count <= len(names))."""
    return [names[i * len(names) // count] for i in range(count)]


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class ScaleBench(object):

    def __init__(self, python, hosts, bridges, concurrent):
        self.python = python
        self.counts = {'HOST': hosts, 'BRIDGE': bridges}
        self.concurrent = concurrent
        self.home = self.env = None
        self.prefix = 'sc' + uuid.uuid4().hex[:6]
        self.names = {'HOST': [], 'BRIDGE': []}   # made, in creation order
        self.created = []           # containers that may exist, in creation order
        self.running = []           # booted, in boot order
        self.doubtful = set()       # a command of the concurrency phase failed on them
        self.bridge = self.subnet = None
        self.marks = []             # what names a network object of this run: netns ids
        self.port_base = PORT_BASE + os.getpid() % 10000
        self.times = {}             # key -> seconds, in the order measured
        self.pss = {}               # 'at 100', 'all' -> [(monitor kB, PID 1 kB)]
        self.facts = {}             # concurrency: wall-clock, slowest, commands
        self.checks = []            # (label, problems)
        self.profiles = {}          # ('none' or 'all', net) -> [{step label: ms}]
        self.before = network_objects()

    def cocker(self, *args):
        return [os.path.join(self.home, 'bin', 'cocker')] + list(args)

    def run_cocker(self, *args):
        return run_checked(self.cocker(*args), self.env, 'cocker ' + ' '.join(args))

    def record(self, key, seconds):
        self.times.setdefault(key, []).append(seconds)

    def check(self, label, problems):
        """A correctness check: its problems go to stderr now and make it MISSED."""
        self.checks.append((label, problems))
        for problem in problems[:20]:
            sys.stderr.write('%s: %s\n' % (label, problem))
        if len(problems) > 20:
            sys.stderr.write('%s: ... and %d more\n' % (label, len(problems) - 20))

    def failed_checks(self):
        return [label for label, problems in self.checks if problems]

    def progress(self, what, done, total):
        if sys.stderr.isatty():
            sys.stderr.write('\r%s %d/%d' % (what, done, total))
            if done == total:
                sys.stderr.write('\n')
            sys.stderr.flush()
        elif done % 100 == 0 or done == total:
            sys.stderr.write('%s %d/%d\n' % (what, done, total))

    # -- setting up -------------------------------------------------------------------

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-scale-', self.python)
        sys.stderr.write('COCKER_HOME %s, containers %s*\n' % (self.home, self.prefix))
        if self.counts['BRIDGE']:
            self.bridge = 'ckb' + uuid.uuid4().hex[:8]
            self.subnet = free_subnet()
            with open(os.path.join(self.home, 'network.conf'), 'w') as f:
                f.write('bridge = %s\naddress = %s\n' % (self.bridge, self.subnet))
        _, out = self.run_cocker('-a', 'install_test')
        if 'OK' not in out:
            raise BenchError('cocker -a install_test did not print OK: %r' % out)

    def container_file(self, name, key):
        return os.path.join(self.home, 'containers', name, key)

    def create(self, net):
        number = len(self.names[net])
        name = '%s%s%04d' % (self.prefix, net[0].lower(), number)
        options = ['--net', net]
        if net == 'BRIDGE':
            options += ['--port-mapping', '%d:80' % (self.port_base + number)]
        self.names[net].append(name)
        self.created.append(name)
        seconds = self.run_cocker('-a', 'create', '-m', 'test', '-c', name, *options)[0]
        try:
            with open(self.container_file(name, 'netns')) as f:
                netns = f.read().strip()
        except OSError:
            netns = ''
        if netns:
            # nns<X>; its veth is eth<X> (cocker's names, those of the C cocker)
            self.marks.append(netns[3:] if netns.startswith('nns') else netns)
        return seconds

    def time_python_beside(self, key):
        """python -c pass, timed just before the command measured under key."""
        self.record('python beside ' + key,
                    run_checked([self.python, '-c', 'pass'], self.env, 'python -c pass')[0])

    def require_memory(self):
        free = available_mb()
        if free is not None and free < MIN_AVAILABLE_MB:
            raise BenchError('only %d MB of memory available with %d containers running: '
                             'stopped before the host runs out' % (free, len(self.running)))

    def boot(self, name, key):
        self.require_memory()
        self.time_python_beside(key)
        self.record(key, self.run_cocker('-a', 'boot', '-c', name)[0])
        self.running.append(name)
        if len(self.running) == PSS_AT:
            self.pss['at %d' % PSS_AT] = self.measure_pss()

    # -- memory -----------------------------------------------------------------------

    def container_pids(self, name):
        """(monitor pid, PID 1's pid) of a running container, from pid and init_pid."""
        deadline = time.time() + 2
        while True:
            pids = [read_number(self.container_file(name, key)) for key in ('pid', 'init_pid')]
            if None not in pids:
                return pids
            if time.time() > deadline:
                raise BenchError('container %s is running, but has no pid or init_pid file'
                                 % name)
            time.sleep(0.02)

    def measure_pss(self):
        """[(monitor kB, PID 1 kB)] of every running container."""
        sys.stderr.write('PSS of %d running containers\n' % len(self.running))
        return [tuple(pss_kb(pid) for pid in self.container_pids(name))
                for name in self.running]

    # -- listing ----------------------------------------------------------------------

    def measure_listing(self):
        """-s containers and -s containers --format json, all running; both checked."""
        table_problems, json_problems = set(), set()
        for _ in range(LISTING_REPEAT):
            seconds, out = self.run_cocker('-s', 'containers')
            self.record('list', seconds)
            table_problems.update(listing_problems(listing_rows(out), self.running))
            seconds, out = self.run_cocker('-s', 'containers', '--format', 'json')
            self.record('list json', seconds)
            rows, problems = json_rows(out)
            json_problems.update(problems or listing_problems(rows, self.running))
        self.check('-s containers: a line per container, RUNNING', sorted(table_problems))
        self.check('-s containers --format json: an entry per container, running',
                   sorted(json_problems))

    # -- concurrency ------------------------------------------------------------------

    def concurrency(self):
        """--concurrent commands at once: listings, shutdown then boot, destroy -h."""
        kinds = [('list', 'cycle', 'destroy')[i % 3] for i in range(self.concurrent)]
        targets = iter(spread(self.running, len([k for k in kinds if k != 'list'])))
        sequences, cycled, destroyed = [], [], []
        for kind in kinds:
            if kind == 'list':
                sequences.append([('-s', 'containers')])
                continue
            name = next(targets)
            if kind == 'cycle':
                cycled.append(name)
                sequences.append([('-a', 'shutdown', '-c', name), ('-a', 'boot', '-c', name)])
            else:
                destroyed.append(name)
                sequences.append([('-a', 'destroy', '-c', name, '-h')])
        sys.stderr.write('%d commands at once: %d -s containers, %d shutdown + boot, '
                         '%d destroy -h\n' % (self.concurrent, kinds.count('list'),
                                              len(cycled), len(destroyed)))
        seconds, finished = run_at_once([[self.cocker(*args) for args in sequence]
                                         for sequence in sequences], self.env)
        self.facts['at once'] = seconds
        self.facts['slowest'] = max(c['seconds'] for c in finished)
        self.facts['commands'] = len(finished)
        self.judge_concurrency(finished, cycled, destroyed)

    def judge_concurrency(self, finished, cycled, destroyed):
        """Every command exited 0; the listings among them and the one after agree with
        what was done; then the bookkeeping follows what the listing after shows."""
        failed = ['%s: exit status %d: %s' % (command_text(c['argv'][1:]), c['status'],
                                              last_line(c['err']) if c['err'].strip()
                                              else last_line(c['out']))
                  for c in finished if c['status'] != 0]
        expected = len(cycled) * 2 + self.concurrent - len(cycled)
        if len(finished) != expected:
            failed.append('%d of the %d commands ran (a shutdown failed, its boot was not run)'
                          % (len(finished), expected))
        self.check('concurrency: every command exits 0', failed)
        touched = set(cycled) | set(destroyed)
        untouched = [name for name in self.running if name not in touched]
        meanwhile = set()
        for c in finished:
            if c['argv'][1:] == ['-s', 'containers'] and c['status'] == 0:
                meanwhile.update(listing_problems(listing_rows(c['out']), untouched, touched))
        self.check('concurrency: listings meanwhile show the others RUNNING', sorted(meanwhile))
        gone = set(command['argv'][4] for command in finished if command['status'] == 0 and
                   command['argv'][1:3] == ['-a', 'destroy'])
        booted = set(command['argv'][4] for command in finished if command['status'] == 0 and
                     command['argv'][1:3] == ['-a', 'boot'])
        unsure = touched - gone - booted    # a command of theirs failed: in any state
        _, out = self.run_cocker('-s', 'containers')
        rows = listing_rows(out)
        must_run = [name for name in self.running if name not in gone and name not in unsure]
        self.check('after it: destroyed ones gone, the others RUNNING',
                   listing_problems(rows, must_run, unsure))
        listed = set(name for name, _ in rows)
        self.doubtful = unsure - listed     # left to the cleanup's destroy -f
        self.created = [name for name in self.created if name in listed or name in unsure]
        self.running = [name for name in self.running if name in listed]

    # -- destroy ----------------------------------------------------------------------

    def destroy_all(self):
        self.destroy_fresh('destroy fresh, all running')
        for net in NETS:
            names = [n for n in self.names[net] if n in self.created and n not in self.doubtful]
            for i, name in enumerate(names):
                self.time_python_beside('destroy ' + net)
                before = disk_read_kb()
                self.record('destroy ' + net, self.run_cocker('-a', 'destroy', '-c', name,
                                                              '-h')[0])
                self.record('read destroy ' + net, disk_read_kb() - before)
                self.created.remove(name)
                self.progress('destroyed %s' % net, i + 1, len(names))
        self.running = []
        self.destroy_fresh('destroy fresh, none running')
        _, out = self.run_cocker('-s', 'containers')
        self.check('-s containers lists none after destroying all',
                   listing_problems(listing_rows(out), []))

    def measure(self):
        for net in NETS:
            if self.counts[net]:
                self.profile_boots('none', net)
        for net in NETS:
            for i in range(self.counts[net]):
                self.record('create ' + net, self.create(net))
                self.progress('created %s' % net, i + 1, self.counts[net])
            for i, name in enumerate(self.names[net]):
                self.boot(name, 'boot ' + net)
                self.progress('booted %s' % net, i + 1, self.counts[net])
        self.pss['all'] = self.measure_pss()
        self.facts['idle load'] = idle_load(IDLE_SECONDS)
        self.measure_listing()
        for net in NETS:
            if self.counts[net]:
                self.profile_boots('all', net)
        if self.concurrent:
            self.concurrency()
        self.destroy_all()

    def destroy_fresh(self, key):
        """FLAT_WINDOW HOST containers, each created, booted and at once destroyed: a
        destroy whose container's files are still in the page cache."""
        for _ in range(FLAT_WINDOW):
            self.create('HOST')
            name = self.names['HOST'].pop()     # (not one of the series)
            self.run_cocker('-a', 'boot', '-c', name)
            self.record(key, self.run_cocker('-a', 'destroy', '-c', name, '-h')[0])
            self.created.remove(name)

    def profile_boots(self, key, net):
        """FLAT_WINDOW containers of net, each created, booted under -d and destroyed: when
        each step of their boot was done (boot_steps).  With none running, one more runs
        meanwhile, as with all running: the monitor that forks theirs."""
        forker = None
        if not self.running:
            self.create('HOST')
            forker = self.names['HOST'][-1]     # (left out of the series after these)
            self.run_cocker('-a', 'boot', '-c', forker)
        for _ in range(FLAT_WINDOW):
            self.create(net)
            name = self.names[net].pop()        # (not one of the series)
            self.run_cocker('-d', '-a', 'boot', '-c', name)
            self.profiles.setdefault((key, net), []).append(self.boot_steps(name))
            self.run_cocker('-a', 'destroy', '-c', name, '-h')
            self.created.remove(name)
        if forker is not None:
            self.run_cocker('-a', 'destroy', '-c', forker, '-h')
            self.created.remove(forker)
            self.names['HOST'].remove(forker)

    def boot_steps(self, name):
        """{label of BOOT_STEPS: ms since the boot command's first record} from the end of
        cocker.log (the CLI, the monitor and PID 1 write their -d records there)."""
        with open(os.path.join(self.home, 'cocker.log'), 'rb') as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
            lines = f.read().decode('utf-8', 'replace').splitlines()
        start, found = None, {}
        for line in lines:
            fields = line.split(' | ', 3)
            if len(fields) != 4:
                continue
            if fields[3] == 'cocker -d -a boot -c %s' % name:
                start, found = log_stamp(fields[0]), {}
            elif start is not None:
                for text, label in BOOT_STEPS:
                    if fields[3] == text % name:
                        found[label] = (log_stamp(fields[0]) - start) * 1000.0
        missing = [label for _, label in BOOT_STEPS if label not in found]
        if missing:
            raise BenchError('the log of the boot of %s under -d has no record of: %s'
                             % (name, ', '.join(missing)))
        return found

    # -- cleaning up ------------------------------------------------------------------

    def cleanup(self):
        """Destroy our containers, the bridge, the home; return the problems (strings)."""
        problems = []
        if self.home is None:
            return problems
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the cleanup must finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.created:
            sys.stderr.write('cleanup: destroying %d containers\n' % len(self.created))
        for name in reversed(self.created):
            run_quietly(self.cocker('-a', 'destroy', '-c', name, '-h', '-f'), self.env)
        self.created = []
        if self.bridge and not run_quietly(self.cocker('-a', 'del_bridge'), self.env):
            problems.append('cocker -a del_bridge failed')
        problems += self.processes_left()
        problems += self.mounts_left()
        problems += self.cgroups_left()
        problems += self.network_left()
        return problems + remove_home(self.home)

    def processes_left(self):
        """Processes of the run still there: reported, killed, waited for."""
        problems = []
        for pid, cmdline in processes_using(self.home):
            problems.append('process %d still running: %s (killed)' % (pid, cmdline))
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        end = time.time() + 5                 # the killed ones gone before the mounts
        while processes_using(self.home) and time.time() < end:
            time.sleep(0.05)
        return problems

    def mounts_left(self):
        left = mounts_under(self.home)
        for point in left:
            subprocess.call(['umount', '-l', point])
        return ['still mounted: %s' % ', '.join(left)] if left else []

    def cgroups_left(self):
        """cocker's cgroups (HIERARCHY/cocker/NAME) of this run's containers still there:
        reported and removed."""
        names = set()
        for hierarchy in cgroup_hierarchies():
            try:
                entries = os.listdir(os.path.join(hierarchy, CGROUP_PARENT))
            except OSError:
                continue
            names.update(e for e in entries if e.startswith(self.prefix))
        problems = ['cgroup %s/%s left behind' % (CGROUP_PARENT, name) for name in sorted(names)]
        for name in sorted(names):
            problems += remove_cgroup('/%s/%s' % (CGROUP_PARENT, name))
        return problems

    def network_left(self):
        """Netns, links and iptables rules new since the start: those naming the run's
        bridge, subnet or containers' netns are problems, the others only noted."""
        marks = list(self.marks) + ([self.bridge] if self.bridge else [])
        subnet = None
        if self.subnet:
            subnet = re.compile(r'(?<![0-9])%s\.' % re.escape(self.subnet.rsplit('.', 2)[0]))
        problems = []
        after = network_objects()
        for kind, new in zip(('netns', 'link', 'iptables rule'),
                             (a - b for a, b in zip(after, self.before))):
            for item in sorted(new):
                if any(mark in item for mark in marks) or (subnet and subnet.search(item)):
                    problems.append('%s %s left behind' % (kind, item))
                else:
                    sys.stderr.write('note: %s %s appeared during the run, not one of its '
                                     'own (another run on this host?)\n' % (kind, item))
        return problems

    # -- report -----------------------------------------------------------------------

    def flat_rows(self, label, key, target, growing=True):
        """Median of the first and of the last FLAT_WINDOW, and the ratio of the one with
        the most containers to the one with the fewest: last / first where their number
        grows along the series (create, boot), first / last where it shrinks (destroy)."""
        first, last = (seconds * 1000.0 for seconds in self.ends(key))
        values = self.times[key]
        n = min(FLAT_WINDOW, len(values))
        ratio, text = (last / first, 'last / first') if growing else (first / last,
                                                                       'first / last')
        return [('%s, first %d of %d' % (label, n, len(values)), '%.1f ms' % first, '', ''),
                ('%s, last %d of %d' % (label, n, len(values)), '%.1f ms' % last, '', ''),
                ('%s, %s' % (label, text), '%.2f' % ratio, '<= %s' % target if target else '',
                 verdict(ratio, target))]

    def ends(self, key):
        """(median of the first FLAT_WINDOW, median of the last) of a series, in seconds."""
        values = self.times[key]
        return median(values[:FLAT_WINDOW]), median(values[-FLAT_WINDOW:])

    def beside_rows(self, net, action='boot'):
        """python -c pass timed beside the boots (destroys), and their growth divided by
        its."""
        key, python = action + ' ' + net, 'python beside %s %s' % (action, net)
        growing = action == 'boot'
        (first, last), (python_first, python_last) = self.ends(key), self.ends(python)
        growth = (last / first) / (python_last / python_first)
        return self.flat_rows('  python -c pass beside them', python, None, growing) + [
            ('  -a %s %s / python -c pass, %s' % (action, net, 'last / first' if growing else
                                                  'first / last'),
             '%.2f' % (growth if growing else 1 / growth), '', '')]

    def destroy_rows(self, net):
        """The destroys, python beside them, what they read from disk at each end."""
        key = 'destroy ' + net
        reads = self.times['read ' + key]
        n = min(FLAT_WINDOW, len(reads))
        return self.flat_rows('-a destroy -h %s' % net, key, FLAT_TARGET, growing=False) + \
            self.beside_rows(net, 'destroy') + [
                ('  read from disk, a destroy of the first %d / of the last %d' % (n, n),
                 '%.0f / %.0f KB' % (median(reads[:n]), median(reads[-n:])), '', '')]

    def fresh_rows(self):
        """A fresh container's destroy with all running, over the same with none."""
        full, empty = (median(self.times['destroy fresh, %s running' % when]) * 1000.0
                       for when in ('all', 'none'))
        ratio = full / empty
        return [('-a destroy -h of a container just booted, all running', '%.1f ms' % full,
                 '', ''),
                ('  the same, none running', '%.1f ms' % empty, '', ''),
                ('  all running / none', '%.2f' % ratio, '<= %s' % FLAT_TARGET,
                 verdict(ratio, FLAT_TARGET))]

    def profile_rows(self, net):
        """Each milestone of a boot: its medians with none and with all running, growth."""
        total = sum(self.counts.values())
        rows = [('boot %s profile: a step done, ms since the command began, none / %d '
                 'running' % (net, total), '', '', 'growth')]
        for _, label in BOOT_STEPS:
            none, full = (median([p[label] for p in self.profiles[key, net]])
                          for key in ('none', 'all'))
            rows.append(('  ' + label, '%.2f / %.2f' % (none, full), '', '%+.2f ms'
                         % (full - none)))
        return rows

    def pss_rows(self, key, label, target):
        if key not in self.pss:
            return [(label, '', '<= %s MB' % target if target else '',
                     'skipped: fewer than %d containers' % PSS_AT)]
        samples = self.pss[key]
        total = median([m + p for m, p in samples]) / 1024.0
        return [(label, '%.2f MB' % total, '<= %s MB' % target if target else '',
                 verdict(total, target)),
                ('  of it the monitor', '%.2f MB' % (median([m for m, _ in samples]) / 1024.0),
                 '', ''),
                ('  of it PID 1', '%.2f MB' % (median([p for _, p in samples]) / 1024.0),
                 '', '')]

    def rows(self):
        rows = []
        for net in NETS:
            if self.counts[net]:
                rows += self.flat_rows('-a create %s' % net, 'create ' + net, None)
                rows += self.flat_rows('-a boot %s' % net, 'boot ' + net, FLAT_TARGET)
                rows += self.beside_rows(net)
        total = sum(self.counts.values())
        rows += self.pss_rows('at %d' % PSS_AT, 'PSS monitor + PID 1, %d running' % PSS_AT,
                              PSS_TARGET_MB)
        rows += self.pss_rows('all', 'PSS monitor + PID 1, %d running' % total, None)
        if 'idle load' in self.facts:
            busy, busiest = self.facts['idle load']
            rows.append(('host CPU busy, %d running and idle' % total, '%.0f %%' % busy, '',
                         ''))
            if busiest:
                rows.append(('  the busiest process: %s' % busiest[0],
                             '%.0f %%' % busiest[1], '', ''))
        listing = median(self.times['list']) * 1000.0
        rows.append(('-s containers, %d running' % total, '%.1f ms' % listing,
                     '<= %d ms' % LISTING_TARGET_MS, verdict(listing, LISTING_TARGET_MS)))
        rows.append(('-s containers --format json, %d running' % total,
                     '%.1f ms' % (median(self.times['list json']) * 1000.0), '', ''))
        for net in NETS:
            if ('all', net) in self.profiles:
                rows += self.profile_rows(net)
        if self.facts:
            rows.append(('%d commands at once (%d run), wall-clock' % (
                self.concurrent, self.facts['commands']),
                '%.0f ms' % (self.facts['at once'] * 1000.0), '', ''))
            rows.append(('  the slowest of them', '%.0f ms' % (self.facts['slowest'] * 1000.0),
                         '', ''))
        for net in NETS:
            if self.times.get('destroy ' + net):
                rows += self.destroy_rows(net)
        if self.times.get('destroy fresh, none running'):
            rows += self.fresh_rows()
        for label, problems in self.checks:
            rows.append((label, '', 'correct', 'MISSED (%d problems, see stderr)'
                         % len(problems) if problems else 'OK'))
        return rows

    def report(self):
        rows = self.rows()
        width = max(len(row[0]) for row in rows)
        lines = ['python %s (%s); %d HOST and %d BRIDGE containers; %d commands at once' % (
                     self.python, python_version(self.python), self.counts['HOST'],
                     self.counts['BRIDGE'], self.concurrent),
                 '',
                 '%-*s %10s %10s  %s' % (width, 'measure', 'median', 'target', 'result')]
        for label, value, target, result in rows:
            lines.append(('%-*s %10s %10s  %s' % (width, label, value, target, result)).rstrip())
        print('\n'.join(lines))


def log_stamp(text):
    """Seconds since the epoch of a cocker.log record's 'YYYY-MM-DD HH:MM:SS.UUUUUU'."""
    return time.mktime(time.strptime(text[:19], '%Y-%m-%d %H:%M:%S')) + float(text[19:])


def verdict(value, target):
    """OK or MISSED against a target (value <= target); '' without one."""
    if target is None:
        return ''
    return 'OK' if value <= target else 'MISSED'


def busy_ticks():
    """(busy, all) clock ticks of the host's CPUs so far, from /proc/stat."""
    with open('/proc/stat') as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)     # (idle and iowait not busy)


def process_ticks():
    """(pid, name, start time) -> CPU clock ticks so far, of every process now."""
    found = {}
    for entry in os.listdir('/proc'):
        stat = process_stat(entry) if entry.isdigit() else None
        if stat:
            found[(entry, stat[0], stat[2])] = stat[3]
    return found


def idle_load(seconds):
    """(% of all CPUs busy, (name, % of one CPU) of the busiest process) over `seconds`."""
    hz = os.sysconf('SC_CLK_TCK')
    before, processes = busy_ticks(), process_ticks()
    time.sleep(seconds)
    after, later = busy_ticks(), process_ticks()
    busy = 100.0 * (after[0] - before[0]) / max(after[1] - before[1], 1)
    used = [(later[key] - ticks, key[1]) for key, ticks in processes.items() if key in later]
    top = max(used) if used else None
    return busy, (top[1], 100.0 * top[0] / hz / seconds) if top else None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Many idle containers: boot, -s containers and destroy as their number '
                    'grows, the memory of one, and correctness with many commands at once '
                    '(run as root).')
    parser.add_argument('--host', type=int, default=1000, metavar='N',
                        help='HOST containers (default 1000)')
    parser.add_argument('--bridge', type=int, default=0, metavar='N',
                        help='BRIDGE containers, made after the HOST ones (default 0; the '
                             'issue asks for 500)')
    parser.add_argument('--concurrent', type=int, default=50, metavar='N',
                        help='commands started at once (default 50; 0: none)')
    parser.add_argument('--python', metavar='PATH', help=PYTHON_HELP)
    args = parser.parse_args(argv)
    total = args.host + args.bridge
    if args.host < 0 or args.bridge < 0 or total < 1:
        parser.error('--host and --bridge must not be negative, and not both 0')
    if not 0 <= args.concurrent <= total:
        parser.error('--concurrent must be between 0 and the number of containers (%d)'
                     % total)
    made = []

    def make_bench(python):
        made.append(ScaleBench(python, args.host, args.bridge, args.concurrent))
        return made[-1]
    status = launch('bench_scale.py', make_bench, args.python)
    failed = made[-1].failed_checks() if made else []
    if status == 0 and failed:
        sys.stderr.write('bench_scale.py: FAILED: %s\n' % '; '.join(failed))
        status = 1
    return status


if __name__ == '__main__':
    sys.exit(main())
