"""Network benchmark of cocker: what BRIDGE costs at boot, and whether that stays flat as the
number of running BRIDGE containers grows.

What is measured (median wall-clock time of --repeat runs, each command a fresh process):

    boot HOST                 -a boot of a stopped --net HOST container
    boot BRIDGE               -a boot of a stopped --net BRIDGE container with one port
                              mapping (netns, veth pair, addresses, route, iptables rules)
    shutdown HOST / BRIDGE    -a shutdown of the same (teardown of all of that)
    boot BRIDGE at L running  the boot (and shutdown) of one more BRIDGE container while L
                              = 1, 10 and 50 others run, each with a port mapping of its own

and the ratios boot BRIDGE / boot HOST and boot at 50 running / boot at 1 running (flat
means close to 1: no boot reads every container or every iptables rule).

HOST and BRIDGE boots alternate within a round, so a drift of the machine touches both
alike.  Everything happens in a temporary COCKER_HOME with a bridge and a 10.x.0.0/16 of
its own (network.conf), removed at the end with every container, netns, link and iptables
rule made here, pass or fail; the run fails loudly if anything is left.

    sudo /usr/bin/python3 bench/bench_network.py [--repeat N] [--levels 1,10,50]

Runs under Python 3.6 and newer.
"""

import argparse
import os
import signal
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (BenchError, bench_home, command_text, median, launch, PYTHON_HELP,  # noqa: E402
                   processes_using, python_version, remove_home, run_checked)


def network_objects():
    """Named netns, links and iptables rules of the host, to find what a run leaves."""
    def out(argv):
        try:
            return subprocess.check_output(argv, stderr=subprocess.DEVNULL,
                                           universal_newlines=True)
        except (OSError, subprocess.CalledProcessError):
            return ''
    netns = set(l.split()[0] for l in out(['ip', 'netns', 'list']).splitlines() if l.strip())
    links = set(l.split()[0].split('@')[0] for l in out(['ip', '-br', 'link']).splitlines())
    rules = set(l for l in out(['iptables-save']).splitlines() if l.startswith('-A '))
    return netns, links, rules


def free_subnet():
    routes = subprocess.check_output(['ip', '-4', 'route', 'show', 'table', 'all'],
                                     universal_newlines=True)
    for second in range(160, 250):
        if ' 10.%d.' % second not in ' ' + routes.replace('\n', ' '):
            return '10.%d.0.1/16' % second
    raise BenchError('no free 10.x.0.0/16 for the benchmark bridge')


class NetworkBench(object):

    def __init__(self, python, repeat, levels):
        self.python, self.repeat, self.levels = python, repeat, levels
        self.home = self.env = None
        self.created = []
        self.times = {}
        self.next_port = 30000 + os.getpid() % 5000
        self.before = network_objects()

    def cocker(self, *args):
        argv = [os.path.join(self.home, 'bin', 'cocker')] + list(args)
        return run_checked(argv, self.env, 'cocker ' + ' '.join(args))

    def record(self, key, seconds):
        self.times.setdefault(key, []).append(seconds)

    def create(self, net):
        name = '%s%d' % (net[0].lower(), len(self.created))
        options = ['--net', net]
        if net == 'BRIDGE':
            self.next_port += 1
            options += ['--port-mapping', '%d:80' % self.next_port]
        self.created.append(name)
        self.cocker('-a', 'create', '-m', 'test', '-c', name, *options)
        return name

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-net-', self.python)
        with open(os.path.join(self.home, 'network.conf'), 'w') as f:
            f.write('bridge = ckb%s\naddress = %s\n' % (uuid.uuid4().hex[:8], free_subnet()))
        sys.stderr.write('COCKER_HOME %s\n' % self.home)
        self.cocker('-a', 'install_test')

    def boot_and_stop(self, name, key):
        self.record('boot ' + key, self.cocker('-a', 'boot', '-c', name)[0])
        self.record('shutdown ' + key, self.cocker('-a', 'shutdown', '-c', name)[0])

    def measure(self):
        host, bridge = self.create('HOST'), self.create('BRIDGE')
        self.boot_and_stop(host, 'warm')            # first BRIDGE boot makes the bridge
        self.boot_and_stop(bridge, 'warm')
        for i in range(self.repeat):
            self.boot_and_stop(host, 'HOST')
            self.boot_and_stop(bridge, 'BRIDGE')
        probe = self.create('BRIDGE')
        running = []
        for level in self.levels:
            while len(running) < level:
                name = self.create('BRIDGE')
                self.cocker('-a', 'boot', '-c', name)
                running.append(name)
            sys.stderr.write('%d BRIDGE containers running\n' % len(running))
            for i in range(self.repeat):
                self.boot_and_stop(probe, 'at %d' % level)

    def cleanup(self):
        problems = []
        if self.home is None:
            return problems
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name in reversed(self.created):
            argv = [os.path.join(self.home, 'bin', 'cocker'), '-a', 'destroy', '-c', name,
                    '-h', '-f']
            if subprocess.call(argv, env=self.env, stdout=subprocess.DEVNULL) != 0:
                problems.append('%s failed' % command_text(argv))
        argv = [os.path.join(self.home, 'bin', 'cocker'), '-a', 'del_bridge']
        if subprocess.call(argv, env=self.env, stdout=subprocess.DEVNULL) != 0:
            problems.append('%s failed' % command_text(argv))
        for pid, cmdline in processes_using(self.home):
            problems.append('process %d still running: %s' % (pid, cmdline))
        after = network_objects()
        for kind, new in zip(('netns', 'link', 'iptables rule'),
                             (a - b for a, b in zip(after, self.before))):
            problems += ['%s %s left behind' % (kind, x) for x in sorted(new)]
        return problems + remove_home(self.home)

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        width = 44
        lines = ['python %s (%s), %d repetitions' % (self.python, python_version(self.python),
                                                     self.repeat), '',
                 '%-*s %9s %9s %9s' % (width, 'measure', 'median ms', 'min ms', 'max ms')]
        keys = ['boot HOST', 'boot BRIDGE', 'shutdown HOST', 'shutdown BRIDGE']
        for level in self.levels:
            keys += ['boot at %d' % level, 'shutdown at %d' % level]
        for key in keys:
            label = key
            if key.startswith(('boot at', 'shutdown at')):
                verb, _, level = key.partition(' at ')
                label = '%s BRIDGE, %s running' % (verb, level)
            values = self.times[key]
            lines.append('%-*s %9.1f %9.1f %9.1f' % (width, label, ms[key], min(values) * 1000,
                                                     max(values) * 1000))
        lines.append('')
        lines.append('%-*s %6.2f' % (width, 'ratio boot BRIDGE / boot HOST',
                                     ms['boot BRIDGE'] / ms['boot HOST']))
        first, last = self.levels[0], self.levels[-1]
        lines.append('%-*s %6.2f  (flat is about 1)' % (
            width, 'ratio boot at %d running / at %d running' % (last, first),
            ms['boot at %d' % last] / ms['boot at %d' % first]))
        lines.append('%-*s %6.2f' % (
            width, 'ratio shutdown at %d running / at %d' % (last, first),
            ms['shutdown at %d' % last] / ms['shutdown at %d' % first]))
        print('\n'.join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description='BRIDGE against HOST boot, and BRIDGE boot '
                                     'as more BRIDGE containers run (run as root).')
    parser.add_argument('--repeat', type=int, default=10, metavar='N')
    parser.add_argument('--levels', default='1,10,50', metavar='L,L,...',
                        help='numbers of running BRIDGE containers (default 1,10,50)')
    parser.add_argument('--python', metavar='PATH', help=PYTHON_HELP)
    args = parser.parse_args(argv)
    levels = sorted(int(x) for x in args.levels.split(','))
    if args.repeat < 1 or not levels or levels[0] < 0:
        parser.error('--repeat must be at least 1 and --levels non-negative numbers')
    return launch('bench_network.py', lambda python: NetworkBench(python, args.repeat, levels),
                  args.python)


if __name__ == '__main__':
    sys.exit(main())
