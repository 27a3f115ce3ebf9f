"""Start-up and lifecycle benchmark of cocker, against floors measured in the same run.

What is measured (median wall-clock time of --repeat runs, time.perf_counter, each command
a fresh process started with subprocess, stdout and stderr piped, stdin /dev/null):

    python -c pass            the interpreter's own start-up: the floor of any cocker command
    cocker -v                 cocker started as operators start it: the two files copied
                              into a bin directory (cocker.py as `cocker`) and run as a
                              program, whose sh header loads it with its bytecode cached
    python cocker.py -v       the same, but Python compiles the whole file at every start
                              (what a main script costs without the header); information only
    unshare floor             `unshare --fork --pid --mount --uts --ipc sh -c 'mount -t overlay
                              ... && chroot MERGED /bin/true'`: new namespaces, an overlay
                              root over the test image and one program run in it, with no
                              Python at all; the mount dies with the namespace
    full cycle                -a create -m test, -a boot, -a run --cmd true, -a destroy -h of
                              a new container (a new name each repetition); each of the four
                              steps is also shown on its own
    -a run                    -a run --cmd true into one container created and booted once

and three ratios: cocker -v / python -c pass (target <= 1.5), full cycle / unshare floor,
-a run / python -c pass.

cocker runs with a real interpreter (COCKER_PYTHON), never a pyenv shim: --python PATH,
else $COCKER_PYTHON, else the interpreter running this script.  PYTHONDONTWRITEBYTECODE is
dropped from the environment, so that the copy keeps its bytecode as on a host.  Everything
happens in a temporary COCKER_HOME (/tmp/cocker-bench-*), built with -a install_test and
removed at the end together with every container made here, pass or fail; /var/cocker is
never touched.  The run fails loudly if a mount or a process of it is left behind.

Run it as root from the repository:

    sudo /usr/bin/python3 bench/bench.py
    python3 bench/bench.py --repeat 5          (already root)

Runs under Python 3.6 and newer.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCKER = os.path.join(REPO, 'cocker.py')
BENCH_CONTAINER = 'bench'


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------

def command_text(argv):
    return ' '.join(shlex.quote(a) for a in argv)


def run_checked(argv, env, what=None):
    """Run argv to completion; return (seconds, stdout).  A non-zero status is fatal."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, universal_newlines=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        # interrupted (SIGTERM, ^C): let the command finish, so that the cleanup does not
        # race a cocker still creating or booting a container; kill it if it hangs
        try:
            proc.communicate(timeout=120)
        except BaseException:
            proc.kill()
            proc.wait()
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError('%s failed with exit status %d\n  command: %s\n  stdout: %s\n  stderr: %s'
                         % (what or 'command', proc.returncode, command_text(argv),
                            out.strip() or '(empty)', err.strip() or '(empty)'))
    return elapsed, out


def median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


# ---------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------

def is_elf(path):
    try:
        with open(path, 'rb') as f:
            return f.read(4) == b'\x7fELF'
    except OSError:
        return False


def real_interpreter(path):
    """The interpreter binary itself: a shim (a script, e.g. pyenv's) is asked for it."""
    found = shutil.which(path) if os.sep not in path else path
    if not found or not os.path.exists(found):
        raise BenchError('python interpreter %r not found' % path)
    found = os.path.abspath(found)
    if is_elf(os.path.realpath(found)):
        return found
    _, out = run_checked([found, '-c', 'import sys; print(sys.executable)'], None,
                         'asking %s for its interpreter' % found)
    real = out.strip()
    if not real or not is_elf(os.path.realpath(real)):
        raise BenchError('%s is not a python binary (a shim?) and did not name one' % found)
    sys.stderr.write('note: %s is a wrapper, using %s\n' % (found, real))
    return real


# ---------------------------------------------------------------------------------------
# Mounts and processes left behind
# ---------------------------------------------------------------------------------------

def unescape_mount(field):
    """/proc/mounts writes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == '\\' and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return ''.join(out)


def mounts_under(path):
    """Mount points at or below path in /proc/mounts, deepest first."""
    path = os.path.realpath(path).rstrip('/')
    found = []
    with open('/proc/mounts') as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                point = unescape_mount(fields[1])
                if point == path or point.startswith(path + '/'):
                    found.append(point)
    return sorted(set(found), key=len, reverse=True)


def processes_using(home):
    """(pid, command line) of processes whose environment or command line names home.

    cocker's monitor inherits COCKER_HOME; cockerinit gets the container directory in
    COCKER_INIT; both are therefore found, and nothing outside this run is."""
    marker = os.fsencode(os.path.realpath(home))
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open('/proc/%s/environ' % entry, 'rb') as f:
                environ = f.read()
            with open('/proc/%s/cmdline' % entry, 'rb') as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in environ or marker in cmdline:
            found.append((int(entry), cmdline.replace(b'\0', b' ').decode('utf-8', 'replace')))
    return found


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class Bench(object):

    def __init__(self, python, repeat):
        self.python = python
        self.repeat = repeat
        self.home = None
        self.env = None
        self.created = []           # containers that may exist, in creation order
        self.times = {}

    def cocker(self, *args):
        return [os.path.join(self.home, 'bin', 'cocker')] + list(args)

    def run_cocker(self, *args):
        argv = self.cocker(*args)
        return run_checked(argv, self.env, 'cocker ' + ' '.join(args))

    def record(self, key, seconds):
        self.times.setdefault(key, []).append(seconds)

    # -- floors -----------------------------------------------------------------------

    def python_pass(self):
        return run_checked([self.python, '-c', 'pass'], self.env, 'python -c pass')[0]

    def unshare_floor(self):
        """Namespaces + overlay of the test image + chroot /bin/true, one process tree."""
        lower = os.path.join(self.home, 'images', 'test', '_', 'rlayer')
        scratch = tempfile.mkdtemp(prefix='floor-', dir=self.home)
        try:
            upper, work, merged = (os.path.join(scratch, d) for d in ('upper', 'work', 'merged'))
            for d in (upper, work, merged):
                os.mkdir(d)
            script = 'mount -t overlay overlay -o %s %s && chroot %s /bin/true' % (
                shlex.quote('lowerdir=%s,upperdir=%s,workdir=%s' % (lower, upper, work)),
                shlex.quote(merged), shlex.quote(merged))
            argv = ['unshare', '--fork', '--pid', '--mount', '--uts', '--ipc', 'sh', '-c', script]
            seconds = run_checked(argv, self.env, 'unshare floor')[0]
            left = mounts_under(scratch)
            if left:
                raise BenchError('the floor overlay is still mounted on the host: %s'
                                 % ', '.join(left))
            return seconds
        finally:
            if not mounts_under(scratch):
                shutil.rmtree(scratch)

    # -- cocker -----------------------------------------------------------------------

    def cycle(self, name):
        """create + boot + run + destroy of a new container; return the four times."""
        self.created.append(name)
        steps = []
        steps.append(self.run_cocker('-a', 'create', '-m', 'test', '-c', name)[0])
        steps.append(self.run_cocker('-a', 'boot', '-c', name)[0])
        steps.append(self.run_cocker('-a', 'run', '-c', name, '--cmd', 'true')[0])
        steps.append(self.run_cocker('-a', 'destroy', '-c', name, '-h')[0])
        self.created.remove(name)
        return steps

    def script_version(self):
        argv = [self.python, COCKER, '-v']
        return run_checked(argv, self.env, 'python cocker.py -v')[0]

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-', self.python)
        sys.stderr.write('COCKER_HOME %s\n' % self.home)
        _, out = self.run_cocker('-a', 'install_test')
        if 'OK' not in out:
            raise BenchError('cocker -a install_test did not print OK: %r' % out)
        self.created.append(BENCH_CONTAINER)
        self.run_cocker('-a', 'create', '-m', 'test', '-c', BENCH_CONTAINER)
        self.run_cocker('-a', 'boot', '-c', BENCH_CONTAINER)

    def measure(self):
        sys.stderr.write('warming up\n')
        self.python_pass()
        self.run_cocker('-v')
        self.script_version()
        self.unshare_floor()
        self.run_cocker('-a', 'run', '-c', BENCH_CONTAINER, '--cmd', 'true')
        self.cycle('b0')
        # one of each per round, so that a drift of the machine touches every measure alike
        for i in range(1, self.repeat + 1):
            if sys.stderr.isatty():
                sys.stderr.write('\rround %d/%d' % (i, self.repeat))
                sys.stderr.flush()
            self.record('pass', self.python_pass())
            self.record('version', self.run_cocker('-v')[0])
            self.record('script', self.script_version())
            self.record('floor', self.unshare_floor())
            self.record('run', self.run_cocker('-a', 'run', '-c', BENCH_CONTAINER,
                                               '--cmd', 'true')[0])
            steps = self.cycle('b%d' % i)
            for key, seconds in zip(('create', 'boot', 'cycle_run', 'destroy'), steps):
                self.record(key, seconds)
            self.record('cycle', sum(steps))
        sys.stderr.write('\r%d rounds done\n' % self.repeat)

    def cleanup(self):
        """Destroy our containers, remove the home; return the problems found (strings)."""
        problems = []
        if self.home is None:
            return problems
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the cleanup must finish
        for name in reversed(self.created):
            argv = self.cocker('-a', 'destroy', '-c', name, '-h', '-f')
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env,
                                        universal_newlines=True)
                _, err = proc.communicate()
                if proc.returncode != 0:
                    sys.stderr.write('cleanup: %s: exit %d: %s\n'
                                     % (command_text(argv), proc.returncode, err.strip()))
            except OSError as e:
                sys.stderr.write('cleanup: %s: %s\n' % (command_text(argv), e))
        self.created = []
        for pid, cmdline in processes_using(self.home):
            problems.append('process %d still running: %s (killed)' % (pid, cmdline))
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        end = time.time() + 5                 # the killed ones gone before the mounts
        while processes_using(self.home) and time.time() < end:
            time.sleep(0.05)
        left = mounts_under(self.home)
        if left:
            problems.append('still mounted: %s' % ', '.join(left))
            for point in left:
                subprocess.call(['umount', '-l', point])
        return problems + remove_home(self.home)

    # -- report -----------------------------------------------------------------------

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        rows = [
            ('python -c pass', 'pass'),
            ('cocker -v', 'version'),
            ('python cocker.py -v (compiled each time)', 'script'),
            ('unshare+overlay+chroot /bin/true', 'floor'),
            ('cocker full cycle', 'cycle'),
            ('  -a create -m test', 'create'),
            ('  -a boot', 'boot'),
            ('  -a run --cmd true (new container)', 'cycle_run'),
            ('  -a destroy -h', 'destroy'),
            ('cocker -a run --cmd true', 'run'),
        ]
        width = 42
        lines = ['python %s (%s), %d repetitions' % (
                     self.python, sys.version.split()[0] if self.python == sys.executable
                     else python_version(self.python), self.repeat),
                 '',
                 '%-*s %9s %9s %9s' % (width, 'measure', 'median ms', 'min ms', 'max ms')]
        for label, key in rows:
            values = self.times[key]
            lines.append('%-*s %9.1f %9.1f %9.1f' % (width, label, ms[key],
                                                     min(values) * 1000.0, max(values) * 1000.0))
        lines.append('')
        ratio_v = ms['version'] / ms['pass']
        lines.append('%-*s %6.2f  (target <= 1.5%s)' % (
            width, 'ratio cocker -v / python -c pass', ratio_v,
            '' if ratio_v <= 1.5 else ', MISSED'))
        lines.append('%-*s %6.2f' % (width, 'ratio full cycle / unshare floor',
                                     ms['cycle'] / ms['floor']))
        lines.append('%-*s %6.2f' % (width, 'ratio -a run / python -c pass',
                                     ms['run'] / ms['pass']))
        print('\n'.join(lines))


def bench_home(prefix, python, parent='/tmp'):
    """A temporary COCKER_HOME with cocker installed as operators do (the two files copied
    into its bin/), and the environment to run it: (home, env)."""
    home = tempfile.mkdtemp(prefix=prefix, dir=parent)
    env = dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=python)
    env.pop('PYTHONDONTWRITEBYTECODE', None)      # keep bytecode, as on a host
    os.mkdir(os.path.join(home, 'bin'))
    shutil.copy2(COCKER, os.path.join(home, 'bin', 'cocker'))
    shutil.copy2(os.path.join(REPO, 'cockerinit.py'), os.path.join(home, 'bin'))
    return home, env


def remove_home(home):
    """Remove a benchmark's COCKER_HOME, never through a mount left below it; return the
    problems (strings)."""
    if mounts_under(home):
        return ['%s kept: mounts under it could not be removed' % home]
    shutil.rmtree(home, ignore_errors=True)
    if os.path.exists(home):
        return ['could not remove %s' % home]
    return []


def leave_home(home):
    """Out of a benchmark's COCKER_HOME (it was the working directory), then remove it."""
    os.chdir('/')
    return remove_home(home) if home and os.path.isdir(home) else []


def python_version(python):
    try:
        out = subprocess.check_output(
            [python, '-c', 'import sys; print(sys.version.split()[0])'],
            stdin=subprocess.DEVNULL, universal_newlines=True)
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return '?'


def on_sigterm(signum, frame):
    raise SystemExit('terminated by signal %d' % signum)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Time cocker -v, a container lifecycle and -a run against floors '
                    'measured in the same run (run as root).')
    parser.add_argument('--repeat', type=int, default=15, metavar='N',
                        help='timed runs of each measure; medians are reported (default 15)')
    parser.add_argument('--python', metavar='PATH',
                        help='interpreter running cocker (default $COCKER_PYTHON, else the '
                             'one running this script)')
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error('--repeat must be at least 1')
    if os.geteuid() != 0:
        sys.stderr.write('bench.py: cocker needs root; run: sudo %s %s\n'
                         % (sys.executable, ' '.join(sys.argv)))
        return 1
    for tool in ('unshare', 'sh'):
        if not shutil.which(tool):
            sys.stderr.write('bench.py: %s not found on PATH\n' % tool)
            return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    return run_benchmark('bench.py', lambda python: Bench(python, args.repeat), args.python)


def image_bench_main(program, description, make_bench, argv=None):
    """The command line of the image and registry benchmarks: --repeat, --size-mb,
    --python; make_bench(python, repeat, size in bytes) builds the benchmark object."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--repeat', type=int, default=3, metavar='N')
    parser.add_argument('--size-mb', type=int, default=200, metavar='MB')
    parser.add_argument('--python', metavar='PATH')
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1:
        parser.error('--repeat and --size-mb must be at least 1')
    if os.geteuid() != 0:
        sys.stderr.write('%s: cocker needs root\n' % program)
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    return run_benchmark(program, lambda python: make_bench(python, args.repeat,
                                                            args.size_mb << 20), args.python)


def run_benchmark(program, make_bench, python=None):
    """Set up, measure, always clean up, then report; return the exit status (2 when
    something was left behind).  make_bench(python) builds the benchmark object."""
    bench = None
    status = 0
    try:
        python = real_interpreter(python or os.environ.get('COCKER_PYTHON') or sys.executable)
        bench = make_bench(python)
        bench.setup()
        bench.measure()
    except BenchError as e:
        sys.stderr.write('\n%s: ERROR: %s\n' % (program, e))
        status = 1
    except KeyboardInterrupt:
        sys.stderr.write('\n%s: interrupted\n' % program)
        status = 130
    finally:
        problems = bench.cleanup() if bench is not None else []
        for p in problems:
            sys.stderr.write('%s: LEFT BEHIND: %s\n' % (program, p))
        if problems:
            status = status or 2
    if status == 0:
        bench.report()
    return status


if __name__ == '__main__':
    sys.exit(main())
