"""Start-up and lifecycle benchmark of cocker, against floors and peers measured in the same run.

What is measured (median wall-clock time of --repeat runs, time.perf_counter, each command
a fresh process started with subprocess, stdout and stderr piped, stdin /dev/null):

    python -c pass            the interpreter's own start-up, site packages scanned
    python -I -S -c pass      the same as cocker's sh header starts it (isolated, no site
                              scan): the floor of any cocker command, the "one interpreter
                              start" of the issue's targets
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
    one-shot                  -a create -m test -c NAME -b -e true --rm, as docker run --rm:
                              create, boot, run, remove in one command (a new name each time)

and two peers, each optional (installed with apt-get or dnf when missing, skipped with a
note when that fails or its first run does; --no-peers skips both):

    runc run                  `runc --root STATE run --bundle BUNDLE ID` of /bin/true: the
                              bundle's config from `runc spec` (terminal off, its own empty
                              network namespace, cgroups under /cocker-bench-*-runc/ID), its
                              root the test image's directory, read-only; a new ID each time
    podman run --rm           of /bin/true in the test image imported into a podman storage
                              of this run's own (--root under COCKER_HOME, --runroot and
                              --tmpdir under /tmp/pbr-*), runtime runc, cgroupfs under
                              /cocker-bench-*-podman, no events, --network none, ulimits nofile
                              and nproc 1024 (podman's default is above this host's); the
                              import goes through a private tmpfs over /var/lib/containers,
                              so that the host's blob cache is not written

The report gives the ratios cocker -v / python -c pass (target <= 1.5), one-shot / runc
run (target <= 2) and one-shot / podman run --rm (target <= 0.25), for information cocker -v
/ python -I -S -c pass (what loading cocker adds to the start), full cycle / unshare floor,
-a run / python -c pass, full cycle / runc run and full cycle / podman run --rm, and the
absolute targets: full cycle <= 80 ms, its boot <= 30 ms, its destroy -h <= 20 ms, -a run
<= 20 ms, each also in interpreter starts (python -I -S -c pass), the unit in which the
targets assume a start of ~10 ms (8, 3, 2 and 2 starts).  A target missed is marked MISSED.

cocker runs with a real interpreter (COCKER_PYTHON), never a pyenv shim: --python PATH,
else $COCKER_PYTHON, else the interpreter running this script.  PYTHONDONTWRITEBYTECODE is
dropped from the environment, so that the copy keeps its bytecode as on a host.  Everything
happens in a temporary COCKER_HOME (/tmp/cocker-bench-*), built with -a install_test and
removed at the end together with every container made here, pass or fail; /var/cocker is
never touched.  The peers' containers, images, runc state, mounts and cgroups go too.  The
run fails loudly if a mount or a process of it is left behind.  Nothing is sent beyond
loopback: the peers' containers have an empty network namespace of their own (runc's default
spec, podman --network none), cocker's run true in the host's (HOST, the default) and send
nothing; only a peer missing is installed, from the host's package repositories.

Run it as root from the repository:

    sudo /usr/bin/python3 bench/bench.py
    python3 bench/bench.py --repeat 5          (already root)
    python3 bench/bench.py --no-peers          (cocker and its floors only)

Runs under Python 3.6 and newer.
"""

import argparse
import json
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
PODMAN_IMAGE = 'localhost/cocker-bench:latest'
PODMAN_SYSTEM_DIR = '/var/lib/containers'       # podman import's blob cache, whatever --root
RUNC_DEFAULT_ROOT = '/run/runc'                 # where podman's runc keeps its state


class BenchError(Exception):
    """A failed step; brief is one line of it (for a note)."""

    def __init__(self, message, brief=None):
        Exception.__init__(self, message)
        self.brief = brief or message.split('\n')[0]


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
        finish_or_kill(proc)
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError('%s failed with exit status %d\n  command: %s\n  stdout: %s\n  stderr: %s'
                         % (what or 'command', proc.returncode, command_text(argv),
                            out.strip() or '(empty)', err.strip() or '(empty)'),
                         '%s: exit status %d: %s' % (what or argv[0], proc.returncode,
                                                     last_line(err) or last_line(out)))
    return elapsed, out


def finish_or_kill(proc):
    """Interrupted (SIGTERM, ^C): let the command finish, so that the cleanup does not race
    a cocker still creating or booting a container (or an import still writing); kill it
    if it hangs."""
    try:
        proc.communicate(timeout=120)
    except BaseException:
        proc.kill()
        proc.wait()


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else '(no output)'


def run_quietly(argv, env=None):
    """Run a cleanup command; a failure is written to stderr, never raised."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, universal_newlines=True)
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.stderr.write('cleanup: %s: exit %d: %s\n'
                             % (command_text(argv), proc.returncode, err.strip()))
        return proc.returncode == 0
    except OSError as e:
        sys.stderr.write('cleanup: %s: %s\n' % (command_text(argv), e))
        return False


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


def process_stat(pid):
    """(command name, state, start time in clock ticks since boot, user + system CPU time
    in clock ticks) of a process, or None."""
    try:
        with open('/proc/%s/stat' % pid) as f:
            text = f.read()
    except OSError:
        return None
    # the name is in parentheses and may hold anything: the fields follow the last ')'
    name = text[text.index('(') + 1:text.rindex(')')]
    fields = text[text.rindex(')') + 2:].split()
    return name, fields[0], int(fields[19]), int(fields[11]) + int(fields[12])


def zombies_named(name, since):
    """Zombies called name started at or after since (clock ticks): conmon double-forks,
    so that the ones of our podman runs are reaped by pid 1, not by us."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            stat = process_stat(entry)
            if stat and stat[0] == name and stat[1] == 'Z' and stat[2] >= since:
                found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------
# cgroups the peers make
# ---------------------------------------------------------------------------------------

def cgroup_hierarchies():
    """Mount points of the cgroup (v1) and cgroup2 file systems, e.g. /sys/fs/cgroup/memory
    and /sys/fs/cgroup/unified on a hybrid host."""
    found = []
    with open('/proc/mounts') as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] in ('cgroup', 'cgroup2'):
                found.append(unescape_mount(fields[1]))
    return sorted(set(found))


def remove_cgroup(path):
    """rmdir the cgroup path (e.g. /name) and those below it in every hierarchy, deepest
    first; return the problems (strings).  An empty cgroup goes; one in use stays."""
    problems = []
    for hierarchy in cgroup_hierarchies():
        top = os.path.join(hierarchy, path.lstrip('/'))
        if not os.path.isdir(top):
            continue
        for dirpath, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError as e:
                problems.append('cgroup %s: %s' % (dirpath, e.strerror))
    return problems


# ---------------------------------------------------------------------------------------
# Peers: runc and podman running /bin/true in the test image
# ---------------------------------------------------------------------------------------

def install_tools(tools):
    """apt-get (else dnf) install of the packages named as the tools; return None when it
    worked, else why not (one line)."""
    if shutil.which('apt-get'):
        argv = ['apt-get', 'install', '-y', '-qq', '--no-install-recommends'] + list(tools)
    elif shutil.which('dnf'):
        argv = ['dnf', 'install', '-y', '-q'] + list(tools)
    else:
        return 'not on PATH, and neither apt-get nor dnf to install it'
    sys.stderr.write('installing %s\n' % ' '.join(tools))
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        run_checked(argv, env, argv[0] + ' install')
    except (BenchError, OSError) as e:
        return 'not on PATH, and %s' % getattr(e, 'brief', e)
    return None


def run_pipe(first, second, env, what):
    """first | second, both to completion; a non-zero status of either is a BenchError."""
    producer = subprocess.Popen(first, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
    try:
        consumer = subprocess.Popen(second, stdin=producer.stdout, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, universal_newlines=True)
    except BaseException:
        producer.kill()
        producer.wait()
        raise
    finally:
        producer.stdout.close()                 # the consumer holds the only reading end
    try:
        out, err = consumer.communicate()
        producer.wait()
    except BaseException:
        for proc in (consumer, producer):
            finish_or_kill(proc)
        raise
    if producer.returncode != 0:
        raise BenchError('%s: %s exited %d' % (what, command_text(first), producer.returncode))
    if consumer.returncode != 0:
        raise BenchError('%s failed with exit status %d\n  command: %s\n  stderr: %s'
                         % (what, consumer.returncode, command_text(second),
                            err.strip() or '(empty)'),
                         '%s: exit status %d: %s' % (what, consumer.returncode,
                                                     last_line(err) or last_line(out)))


class RuncPeer(object):
    """runc run of /bin/true with the test image's root as a read-only bundle root."""

    name = 'runc'
    key = 'runc'

    def __init__(self, home, env):
        self.home = home
        self.env = env
        self.dir = None                 # HOME/runc-*: bundle/ and the state directory
        self.config = None
        self.count = 0
        self.cgroup = '/%s-runc' % os.path.basename(home)

    def state(self):
        return os.path.join(self.dir, 'state')

    def bundle(self):
        return os.path.join(self.dir, 'bundle')

    def setup(self):
        self.dir = tempfile.mkdtemp(prefix='runc-', dir=self.home)
        os.mkdir(self.bundle())
        run_checked(['runc', 'spec', '--bundle', self.bundle()], self.env, 'runc spec')
        path = os.path.join(self.bundle(), 'config.json')
        with open(path) as f:
            config = json.load(f)
        config['process']['args'] = ['/bin/true']
        config['process']['terminal'] = False
        config['root'] = {'path': os.path.join(self.home, 'images', 'test', '_', 'rlayer'),
                          'readonly': True}
        self.config = config

    def run(self):
        """One `runc run` of a new container (it deletes it when /bin/true ends)."""
        self.count += 1
        cid = 'bench-%d' % self.count
        # its cgroups under one of ours, not runc's default (beside pid 1's in some
        # hierarchies): the cleanup can then check that none is left
        self.config['linux']['cgroupsPath'] = '%s/%s' % (self.cgroup, cid)
        with open(os.path.join(self.bundle(), 'config.json'), 'w') as f:
            json.dump(self.config, f)
        argv = ['runc', '--root', self.state(), 'run', '--bundle', self.bundle(), cid]
        return run_checked(argv, self.env, 'runc run')[0]

    def stop(self):
        """runc delete -f of any container still in our state directory."""
        if self.dir is None or not os.path.isdir(self.state()):
            return
        for cid in sorted(os.listdir(self.state())):
            run_quietly(['runc', '--root', self.state(), 'delete', '-f', cid], self.env)

    def outside_dirs(self):
        return []

    def remove(self):
        """Our cgroups; the bundle and the state go with the home.  Return the problems."""
        problems = []
        if self.dir is not None and os.path.isdir(self.state()) and os.listdir(self.state()):
            problems.append('runc containers kept: %s' % ', '.join(os.listdir(self.state())))
        return problems + remove_cgroup(self.cgroup)


class PodmanPeer(object):
    """podman run --rm of /bin/true in the test image, imported into a storage of ours."""

    name = 'podman'
    key = 'podman'

    def __init__(self, home, env):
        self.home = home
        self.root = None                # --root, under the home
        self.runroot = None             # --runroot: /tmp/pbr-*, as its path must be short
        self.made_system_dir = False
        self.env = env
        self.cgroup = '/%s-podman' % os.path.basename(home)

    def podman(self, *args):
        return ['podman', '--root', self.root, '--runroot', self.runroot,
                '--tmpdir', os.path.join(self.runroot, 'libpod'),
                '--network-config-dir', os.path.join(self.root, 'networks'),
                '--runtime', 'runc', '--cgroup-manager', 'cgroupfs',
                '--events-backend', 'none'] + list(args)

    def setup(self):
        self.root = tempfile.mkdtemp(prefix='podman-', dir=self.home)
        self.runroot = tempfile.mkdtemp(prefix='pbr-', dir='/tmp')
        os.mkdir(os.path.join(self.root, 'tmp'))
        # podman's temporary files (image copies) in our storage, not in /var/tmp
        self.env = dict(self.env, TMPDIR=os.path.join(self.root, 'tmp'))
        if not os.path.isdir(PODMAN_SYSTEM_DIR):
            os.makedirs(PODMAN_SYSTEM_DIR, 0o700)
            self.made_system_dir = True
        # the import writes a blob cache in PODMAN_SYSTEM_DIR/cache whatever --root says:
        # a tmpfs over it in a mount namespace of the import's own takes it
        lower = os.path.join(self.home, 'images', 'test', '_', 'rlayer')
        private = ['unshare', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                   PODMAN_SYSTEM_DIR]
        run_pipe(['tar', '-C', lower, '-c', '.'],
                 private + self.podman('import', '-', PODMAN_IMAGE), self.env, 'podman import')

    def run(self):
        argv = self.podman('run', '--rm', '--network', 'none', '--cgroup-parent', self.cgroup,
                           '--ulimit', 'nofile=1024:1024', '--ulimit', 'nproc=1024:1024',
                           PODMAN_IMAGE, '/bin/true')
        return run_checked(argv, self.env, 'podman run')[0]

    def stop(self):
        """Remove every container and image of our storage, and any runc state of it."""
        if self.root is None or not shutil.which('podman'):
            return
        run_quietly(self.podman('rm', '-af'), self.env)
        run_quietly(self.podman('rmi', '-af'), self.env)
        for cid in runc_containers_naming(RUNC_DEFAULT_ROOT, self.root):
            run_quietly(['runc', 'delete', '-f', cid], self.env)

    def outside_dirs(self):
        return [self.runroot] if self.runroot else []

    def remove(self):
        """Our cgroups, the runroot, the directory made for the import; the storage goes
        with the home.  Return the problems."""
        problems = []
        if self.root is not None:
            left = runc_containers_naming(RUNC_DEFAULT_ROOT, self.root)
            if left:
                problems.append('runc state of podman kept: %s' % ', '.join(left))
        problems += remove_cgroup(self.cgroup)
        if self.runroot and os.path.isdir(self.runroot):
            problems += remove_home(self.runroot)
        if self.made_system_dir:
            try:
                os.rmdir(PODMAN_SYSTEM_DIR)
            except OSError as e:
                problems.append('%s (made for the import): %s' % (PODMAN_SYSTEM_DIR, e.strerror))
        return problems


def runc_containers_naming(root, path):
    """Containers in runc's state directory root whose state names path (their bundle)."""
    found = []
    try:
        entries = os.listdir(root)
    except OSError:
        return found
    for cid in entries:
        try:
            with open(os.path.join(root, cid, 'state.json')) as f:
                if path in f.read():
                    found.append(cid)
        except OSError:
            continue
    return sorted(found)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class Bench(object):

    def __init__(self, python, repeat, peers=True):
        self.python = python
        self.repeat = repeat
        self.want_peers = peers
        self.home = None
        self.env = None
        self.created = []           # containers that may exist, in creation order
        self.peers = []             # RuncPeer, PodmanPeer: each to clean up once made
        self.skipped = {}           # peer name -> why it is not measured
        self.times = {}
        self.started = process_stat(os.getpid())[2]

    def cocker(self, *args):
        return [os.path.join(self.home, 'bin', 'cocker')] + list(args)

    def run_cocker(self, *args):
        argv = self.cocker(*args)
        return run_checked(argv, self.env, 'cocker ' + ' '.join(args))

    def record(self, key, seconds):
        self.times.setdefault(key, []).append(seconds)

    # -- floors -----------------------------------------------------------------------

    def python_pass(self, *options):
        command = [self.python] + list(options) + ['-c', 'pass']
        return run_checked(command, self.env, ' '.join(['python'] + command[1:]))[0]

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

    def one_shot(self, name):
        """-a create ... -b -e true --rm: create, boot, run, remove in one command."""
        self.created.append(name)
        seconds = self.run_cocker('-a', 'create', '-m', 'test', '-c', name, '-b', '-e', 'true',
                                  '--rm')[0]
        self.created.remove(name)
        return seconds

    def script_version(self):
        argv = [self.python, COCKER, '-v']
        return run_checked(argv, self.env, 'python cocker.py -v')[0]

    # -- peers ------------------------------------------------------------------------

    def skip(self, name, reason):
        """A peer is left out of the report: a note now, "skipped: reason" in its rows."""
        if name not in self.skipped:
            sys.stderr.write('note: %s skipped: %s\n' % (name, reason))
        self.skipped[name] = reason
        self.times.pop(name, None)

    def setup_peers(self):
        kinds = (RuncPeer, PodmanPeer)
        if not self.want_peers:
            self.skipped = dict((kind.name, '--no-peers') for kind in kinds)
            return
        missing = [kind.name for kind in kinds if not shutil.which(kind.name)]
        why = install_tools(missing) if missing else None
        for kind in kinds:
            if not shutil.which(kind.name):
                self.skip(kind.name, why or 'not on PATH after installing it')
                continue
            peer = kind(self.home, self.env)
            self.peers.append(peer)                 # cleaned up from now on, whatever happens
            try:
                peer.setup()
            except (BenchError, OSError) as e:
                self.skip(peer.name, getattr(e, 'brief', None) or str(e))

    def active_peers(self):
        return [peer for peer in self.peers if peer.name not in self.skipped]

    def run_peer(self, peer, timed=True):
        """One run of a peer, recorded when timed; a failure skips the peer, never the run."""
        try:
            seconds = peer.run()
        except (BenchError, OSError) as e:
            self.skip(peer.name, getattr(e, 'brief', None) or str(e))
            return
        if timed:
            self.record(peer.key, seconds)

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-', self.python)
        sys.stderr.write('COCKER_HOME %s\n' % self.home)
        _, out = self.run_cocker('-a', 'install_test')
        if 'OK' not in out:
            raise BenchError('cocker -a install_test did not print OK: %r' % out)
        self.created.append(BENCH_CONTAINER)
        self.run_cocker('-a', 'create', '-m', 'test', '-c', BENCH_CONTAINER)
        self.run_cocker('-a', 'boot', '-c', BENCH_CONTAINER)
        self.setup_peers()

    def measure(self):
        sys.stderr.write('warming up\n')
        self.python_pass()
        self.python_pass('-I', '-S')
        self.run_cocker('-v')
        self.script_version()
        self.unshare_floor()
        self.run_cocker('-a', 'run', '-c', BENCH_CONTAINER, '--cmd', 'true')
        self.cycle('b0')
        self.one_shot('o0')
        for peer in self.active_peers():
            self.run_peer(peer, timed=False)            # its first run: can it run here?
        # one of each per round, so that a drift of the machine touches every measure alike
        for i in range(1, self.repeat + 1):
            if sys.stderr.isatty():
                sys.stderr.write('\rround %d/%d' % (i, self.repeat))
                sys.stderr.flush()
            self.record('pass', self.python_pass())
            self.record('bare', self.python_pass('-I', '-S'))
            self.record('version', self.run_cocker('-v')[0])
            self.record('script', self.script_version())
            self.record('floor', self.unshare_floor())
            self.record('run', self.run_cocker('-a', 'run', '-c', BENCH_CONTAINER,
                                               '--cmd', 'true')[0])
            steps = self.cycle('b%d' % i)
            for key, seconds in zip(('create', 'boot', 'cycle_run', 'destroy'), steps):
                self.record(key, seconds)
            self.record('cycle', sum(steps))
            self.record('oneshot', self.one_shot('o%d' % i))
            for peer in self.active_peers():
                self.run_peer(peer)
        sys.stderr.write('\r%d rounds done\n' % self.repeat)

    def cleanup(self):
        """Destroy our containers, remove the home; return the problems found (strings)."""
        problems = []
        if self.home is None:
            return problems
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the cleanup must finish
        for name in reversed(self.created):
            run_quietly(self.cocker('-a', 'destroy', '-c', name, '-h', '-f'), self.env)
        self.created = []
        for peer in self.peers:
            peer.stop()
        places = [self.home] + [d for peer in self.peers for d in peer.outside_dirs()]
        killed = set()
        for place in places:
            for pid, cmdline in processes_using(place):
                if pid not in killed:
                    killed.add(pid)
                    problems.append('process %d still running: %s (killed)' % (pid, cmdline))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        end = time.time() + 5                 # the killed ones gone before the mounts
        while any(processes_using(place) for place in places) and time.time() < end:
            time.sleep(0.05)
        while zombies_named('conmon', self.started) and time.time() < end:
            time.sleep(0.05)                  # pid 1 reaps podman's conmons: give it time
        zombies = zombies_named('conmon', self.started)
        if zombies:
            sys.stderr.write('note: conmon zombies not reaped yet by pid 1: %s\n'
                             % ' '.join(str(pid) for pid in zombies))
        for place in places:
            left = mounts_under(place)
            if left:
                problems.append('still mounted: %s' % ', '.join(left))
                for point in left:
                    subprocess.call(['umount', '-l', point])
        for peer in self.peers:
            problems += peer.remove()
        self.peers = []
        return problems + remove_home(self.home)

    # -- report -----------------------------------------------------------------------

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        rows = [
            ('python -c pass', 'pass'),
            ('python -I -S -c pass', 'bare'),
            ('cocker -v', 'version'),
            ('python cocker.py -v (compiled each time)', 'script'),
            ('unshare+overlay+chroot /bin/true', 'floor'),
            ('cocker full cycle', 'cycle'),
            ('  -a create -m test', 'create'),
            ('  -a boot', 'boot'),
            ('  -a run --cmd true (new container)', 'cycle_run'),
            ('  -a destroy -h', 'destroy'),
            ('cocker -a run --cmd true', 'run'),
            ('cocker one-shot -b -e true --rm', 'oneshot'),
            ('runc run /bin/true', 'runc'),
            ('podman run --rm /bin/true', 'podman'),
        ]
        width = 50
        lines = ['python %s (%s), %d repetitions' % (
                     self.python, sys.version.split()[0] if self.python == sys.executable
                     else python_version(self.python), self.repeat),
                 '',
                 '%-*s %9s %9s %9s' % (width, 'measure', 'median ms', 'min ms', 'max ms')]
        for label, key in rows:
            if key in self.skipped:
                lines.append('%-*s skipped: %s' % (width, label, self.skipped[key]))
                continue
            values = self.times[key]
            lines.append('%-*s %9.1f %9.1f %9.1f' % (width, label, ms[key],
                                                     min(values) * 1000.0, max(values) * 1000.0))
        lines.append('')
        ratios = [
            ('cocker -v / python -c pass', 'version', 'pass', 1.5),
            ('cocker -v / python -I -S -c pass', 'version', 'bare', None),
            ('full cycle / unshare floor', 'cycle', 'floor', None),
            ('-a run / python -c pass', 'run', 'pass', None),
            ('one-shot / runc run', 'oneshot', 'runc', 2),
            ('one-shot / podman run --rm', 'oneshot', 'podman', 0.25),
            ('full cycle / runc run', 'cycle', 'runc', None),
            ('full cycle / podman run --rm', 'cycle', 'podman', None),
        ]
        for label, top, bottom, target in ratios:
            label = 'ratio ' + label
            if bottom in self.skipped:
                lines.append('%-*s skipped: %s' % (width, label, self.skipped[bottom]))
                continue
            ratio = ms[top] / ms[bottom]
            lines.append(('%-*s %6.2f  %s' % (width, label, ratio, target_text(ratio, target)))
                         .rstrip())
        lines.append('')
        absolute = [
            ('4-command lifecycle (create+boot+run+destroy -h)', 'cycle', 80),
            ('boot (of the full cycle)', 'boot', 30),
            ('destroy -h (of the full cycle)', 'destroy', 20),
            ('run (-a run --cmd true)', 'run', 20),
        ]
        for label, key, target in absolute:
            lines.append('%-*s %6.1f ms  %s' % (width, label, ms[key],
                                                 target_text(ms[key], target, ' ms')))
            lines.append('%-*s %6.1f starts  (the target: %g at 10 ms)' % (
                width, '  in interpreter starts (python -I -S -c pass)', ms[key] / ms['bare'],
                target / 10.0))
        print('\n'.join(lines))


def target_text(value, target, unit=''):
    """(target <= T), with MISSED when value is above it; '' without a target."""
    if target is None:
        return ''
    return '(target <= %s%s%s)' % (target, unit, '' if value <= target else ', MISSED')


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
        description='Time cocker -v, a container lifecycle, -a run and a one-shot run '
                    'against floors and peers (runc run, podman run --rm) measured in the '
                    'same run (run as root).')
    parser.add_argument('--repeat', type=int, default=15, metavar='N',
                        help='timed runs of each measure; medians are reported (default 15)')
    parser.add_argument('--python', metavar='PATH', help=PYTHON_HELP)
    parser.add_argument('--no-peers', action='store_true',
                        help='do not measure runc run and podman run --rm (nor install them)')
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error('--repeat must be at least 1')
    for tool in ('unshare', 'sh'):
        if not shutil.which(tool):
            sys.stderr.write('bench.py: %s not found on PATH\n' % tool)
            return 1
    return launch('bench.py', lambda python: Bench(python, args.repeat, not args.no_peers),
                  args.python)


def image_bench_main(program, description, make_bench, argv=None):
    """The command line of the image and registry benchmarks: --repeat, --size-mb,
    --python; make_bench(python, repeat, size in bytes) builds the benchmark object."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--repeat', type=int, default=3, metavar='N')
    parser.add_argument('--size-mb', type=int, default=200, metavar='MB')
    parser.add_argument('--python', metavar='PATH', help=PYTHON_HELP)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1:
        parser.error('--repeat and --size-mb must be at least 1')
    return launch(program, lambda python: make_bench(python, args.repeat, args.size_mb << 20),
                  args.python)


PYTHON_HELP = ('interpreter running cocker (default $COCKER_PYTHON, else the one running '
               'this script)')


def launch(program, make_bench, python):
    """Every benchmark's start: root checked, SIGTERM made a clean exit, then
    run_benchmark."""
    if os.geteuid() != 0:
        sys.stderr.write('%s: cocker needs root; run it with sudo\n' % program)
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    return run_benchmark(program, make_bench, python)


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
