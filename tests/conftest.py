"""Shared fixtures: run cocker as a real program against a temporary COCKER_HOME.

cocker runs as operators run it, the file as a program (its sh header loads what the
command needs from the cache beside it), with the interpreter named by $COCKER_PYTHON (CI
runs the lifecycle tests a second time with Python 3.6), else with the one running pytest.  Every container a
test makes is force-destroyed afterwards, pass or fail, and the session ends by checking
that nothing (mount, cockerinit process) is left behind.  Here too: an ssh image repository
on 127.0.0.1 (Repository, the repo fixture), and the lines the session's summary prints,
whatever -r asks, for what this host did not let a test run (not_run).
"""

import importlib.util
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCKER = os.path.join(REPO, 'cocker.py')
COCKERINIT = os.path.join(REPO, 'cockerinit.py')
PYTHON = os.environ.get('COCKER_PYTHON') or sys.executable
COCKER_COMMAND = ['/bin/sh', COCKER]    #: what runs it (sh reads the header's first line)
MARKER = '.cocker-test-home'
SSHD = shutil.which('sshd') or '/usr/sbin/sshd'


def load_script(name, path):
    """Import cocker.py or cockerinit.py by path (they do nothing at import time)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Result(object):
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return 'Result(rc=%r, out=%r, err=%r)' % (self.rc, self.out, self.err)


def needs_root():
    if os.geteuid() != 0:
        pytest.skip('needs root')


def free_test_subnet():
    """A 10.x.0.0/16 that no route of the host touches, for this session's bridge."""
    routes = subprocess.check_output(['ip', '-4', 'route', 'show', 'table', 'all']).decode()
    for _ in range(100):
        second = 100 + int(uuid.uuid4().hex[:4], 16) % 150
        if ' 10.%d.' % second not in ' ' + routes.replace('\n', ' '):
            return second
    raise RuntimeError('no free 10.x.0.0/16 for the test bridge')


def network_objects():
    """Named network namespaces, links and iptables lines (both backends) of the host."""
    def out(argv):
        try:
            return subprocess.check_output(argv, stderr=subprocess.DEVNULL).decode()
        except (OSError, subprocess.CalledProcessError):
            return ''
    netns = set(n.split()[0] for n in out(['ip', 'netns', 'list']).splitlines() if n.strip())
    links = set(l.split()[0].split('@')[0] for l in out(['ip', '-br', 'link']).splitlines())
    rules = set(l.split()[0] if l.startswith(':') else l
                for argv in (['iptables-save'], ['iptables-legacy-save'])
                for l in out(argv).splitlines() if l.startswith(('-A ', ':CKR-')))
    return netns, links, rules


@pytest.fixture(scope='session')
def home():
    """A temporary COCKER_HOME for the whole session, removed only if it carries our marker.
    Its BRIDGE containers use a bridge and a subnet of their own (network.conf), never the
    host's cocker0; at the end nothing of it may be left: mount, process, netns, link, rule."""
    needs_root()
    path = tempfile.mkdtemp(prefix='cocker-test-')
    open(os.path.join(path, MARKER), 'w').close()
    bridge = 'ckt%s' % uuid.uuid4().hex[:8]
    with open(os.path.join(path, 'network.conf'), 'w') as f:
        f.write('bridge = %s\naddress = 10.%d.0.1/16\n' % (bridge, free_test_subnet()))
    before = network_objects()
    yield path
    for name in os.listdir(os.path.join(path, 'containers')) if os.path.isdir(
            os.path.join(path, 'containers')) else []:
        if not name.startswith('.'):
            run_cocker(path, '-a', 'destroy', '-c', name, '-h', '-f')
    removed = run_cocker(path, '-a', 'del_bridge')
    left = [line for line in open('/proc/mounts') if path in line]
    procs = cockerinit_processes(path)
    after = network_objects()
    new = [sorted(a - b) for a, b in zip(after, before)]
    if os.environ.get('COCKER_TEST_KEEP') != '1' and os.path.exists(os.path.join(path, MARKER)):
        if not left:
            shutil.rmtree(path)
    assert removed.rc == 0, removed
    assert not left, 'mounts left behind under %s: %s' % (path, left)
    assert not procs, 'cockerinit processes left behind: %s' % procs
    assert new == [[], [], []], 'network namespaces, links, iptables rules left: %s' % new


def cockerinit_processes(home_path):
    """Host pids of cockerinit processes started for containers of this COCKER_HOME."""
    found = []
    mark = ('COCKER_SOCKDIR=%s/' % home_path).encode()
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmd = f.read()
            with open('/proc/%s/environ' % pid, 'rb') as f:
                env = f.read()
        except OSError:
            continue
        if b'cockerinit' in cmd and b'--container' in cmd and mark in env:
            found.append(int(pid))
    return found


def cocker_process(home_path, *args, **kw):
    """cocker started on home_path and left running: a subprocess.Popen (stdout and stderr
    piped, stdin /dev/null unless given; env= adds variables, the rest goes to Popen)."""
    env = dict(os.environ, COCKER_HOME=home_path, COCKER_PYTHON=PYTHON)
    env.update(kw.pop('env', {}))
    kw.setdefault('stdin', subprocess.DEVNULL)
    return subprocess.Popen(COCKER_COMMAND + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **kw)


def run_cocker(home_path, *args, **kw):
    data, timeout = kw.pop('input', None), kw.pop('timeout', 120)
    if data is not None:
        kw.setdefault('stdin', subprocess.PIPE)
    p = cocker_process(home_path, *args, **kw)
    out, err = p.communicate(data, timeout=timeout)
    return Result(p.returncode, out.decode('utf-8', 'replace'), err.decode('utf-8', 'replace'))


@pytest.fixture(scope='session')
def cocker(home):
    """cocker(*args) -> Result(rc, out, err), run as a separate process."""
    def call(*args, **kw):
        return run_cocker(home, *args, **kw)
    return call


@pytest.fixture(scope='session')
def test_image(cocker):
    r = cocker('-a', 'install_test')
    assert r.rc == 0 and r.out == 'OK\n', r
    return 'test'


def unique_names(default_prefix):
    """new(prefix) -> a name of its own, PREFIX and 8 hex digits; new.made lists them all, for
    the fixture that hands them out to remove what they name afterwards."""
    def new(prefix=default_prefix):
        name = '%s%s' % (prefix, uuid.uuid4().hex[:8])
        new.made.append(name)
        return name
    new.made = []
    return new


@pytest.fixture
def names(cocker, home):
    """Unique container names for one test; each is force-destroyed afterwards."""
    new = unique_names('t')
    yield new
    for name in new.made:
        if os.path.isdir(os.path.join(home, 'containers', name)):
            r = cocker('-a', 'destroy', '-c', name, '-h', '-f')
            assert r.rc == 0, 'cleanup of %s failed: %r' % (name, r)
        left = [line for line in open('/proc/mounts')
                if os.path.join(home, 'containers', name) in line]
        assert not left, 'mounts left after destroying %s: %s' % (name, left)


@pytest.fixture
def running(cocker, test_image, names):
    """A booted container made from the test image: returns its name."""
    def make(*extra):
        name = names()
        r = cocker('-a', 'create', '-m', test_image, '-c', name, *extra)
        assert r.rc == 0, r
        r = cocker('-a', 'boot', '-c', name)
        assert r.rc == 0 and r.out == 'OK\n', r
        return name
    return make


class Terminal(object):
    """cocker running on a real pseudo-terminal, driven like a user at a keyboard."""

    def __init__(self, home_path, args, rows=24, cols=80):
        import pty
        import fcntl
        import termios
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ['COCKER_HOME'] = home_path
            os.environ['TERM'] = 'xterm'
            os.environ['COCKER_PYTHON'] = PYTHON
            os.execv(COCKER_COMMAND[0], COCKER_COMMAND + list(args))
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
        self.output = b''

    def resize(self, rows, cols):
        import fcntl
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))

    def send(self, text):
        os.write(self.fd, text.encode('utf-8'))

    def expect(self, needle, timeout=10):
        """Read until `needle` appears in the output; return everything read so far."""
        needle = needle.encode('utf-8')
        end = time.time() + timeout
        while needle not in self.output:
            left = end - time.time()
            if left <= 0:
                raise AssertionError('did not see %r in %r' % (needle, self.output))
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b''
                if not data:
                    raise AssertionError('EOF before %r in %r' % (needle, self.output))
                self.output += data
        return self.output.decode('utf-8', 'replace')

    def wait(self, timeout=10):
        """Drain output until the program exits; return its exit status."""
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._drain()
                os.close(self.fd)
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            self._drain(0.1)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError('cocker did not exit; output %r' % self.output)

    def _drain(self, timeout=0):
        while select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.output += data
            timeout = 0


@pytest.fixture
def terminal(home):
    made = []

    def start(*args, **kw):
        t = Terminal(home, args, **kw)
        made.append(t)
        return t
    yield start
    for t in made:
        try:
            os.kill(t.pid, 9)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        try:
            os.close(t.fd)
        except OSError:
            pass


def container_path(home_path, name, *parts):
    return os.path.join(home_path, 'containers', name, *parts)


def wait_for(predicate, timeout=10, what='condition'):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError('timed out waiting for %s' % what)


# ---- what this host did not let the session run -----------------------------------------

def pytest_configure(config):
    config.cocker_not_run = []


@pytest.fixture(scope='session')
def not_run(pytestconfig):
    """not_run(text): say at the end of the session, whatever -r asks, that a part of a test
    could not run on this host (a pass that did not test everything must not look whole)."""
    def note(text):
        if text not in pytestconfig.cocker_not_run:
            pytestconfig.cocker_not_run.append(text)
    return note


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    notes = getattr(config, 'cocker_not_run', [])
    if notes:
        terminalreporter.section('not run on this host', sep='-', yellow=True)
        for text in notes:
            terminalreporter.write_line('NOT RUN: %s' % text, yellow=True)


# ---- an ssh image repository on 127.0.0.1 -------------------------------------------------

def free_loopback_port():
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Repository(object):
    """sshd on 127.0.0.1:PORT (its own port, host key and sshd_config) and a dedicated user
    with an authorized key, whose home is the repository; all removed by remove()."""

    def __init__(self):
        if not os.path.exists(SSHD):
            pytest.fail('sshd (openssh-server) is not installed: tests/run.sh installs it')
        self.dir = tempfile.mkdtemp(prefix='cocker-sshd-')
        self.user = 'ckr' + uuid.uuid4().hex[:8]
        self.home = os.path.join(self.dir, 'home')
        self.port = free_loopback_port()
        self.proc = None
        # password '*': no password, but not a locked account (sshd refuses those)
        subprocess.check_call(['useradd', '--home-dir', self.home, '--create-home',
                               '--shell', '/bin/sh', '--password', '*', self.user])
        try:
            self.setup()
        except BaseException:
            self.remove()
            raise

    def keygen(self, path):
        subprocess.check_call(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', path])
        return open(path + '.pub').read().strip()

    def setup(self):
        hostkey = self.keygen(os.path.join(self.dir, 'hostkey'))
        self.key = os.path.join(self.dir, 'id')
        self.wrong_key = os.path.join(self.dir, 'wrong')
        public = self.keygen(self.key)
        self.keygen(self.wrong_key)
        ssh_dir = os.path.join(self.home, '.ssh')
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(ssh_dir, 'authorized_keys'), 'w') as f:
            f.write(public + '\n')
        for path in (ssh_dir, os.path.join(ssh_dir, 'authorized_keys')):
            shutil.chown(path, self.user, None)
        os.chmod(os.path.join(ssh_dir, 'authorized_keys'), 0o600)
        os.chmod(self.dir, 0o755)
        with open(os.path.join(self.dir, 'known_hosts'), 'w') as f:
            f.write('[127.0.0.1]:%d %s\n' % (self.port, ' '.join(hostkey.split()[:2])))
        config = os.path.join(self.dir, 'sshd_config')
        with open(config, 'w') as f:
            f.write('Port %d\nListenAddress 127.0.0.1\nHostKey %s/hostkey\nPidFile %s/sshd.pid\n'
                    'PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n'
                    'AllowUsers %s\nAuthorizedKeysFile .ssh/authorized_keys\n'
                    'StrictModes no\nLogLevel ERROR\n' % (self.port, self.dir, self.dir, self.user))
        self.initial = set(os.listdir(self.home))
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)       # privilege separation
        self.proc = subprocess.Popen([SSHD, '-D', '-e', '-f', config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError('sshd exited with status %d before listening on port %d'
                                     % (self.proc.returncode, self.port))
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(listening, timeout=10, what='sshd to listen on port %d' % self.port)

    def ssh_config(self, key=None):
        return ('Host *\n  IdentityFile %s\n  IdentitiesOnly yes\n  UserKnownHostsFile %s\n'
                '  StrictHostKeyChecking yes\n' % (key or self.key,
                                                   os.path.join(self.dir, 'known_hosts')))

    @property
    def address(self):
        return '%s@127.0.0.1:%d' % (self.user, self.port)

    def files(self):
        """What cocker put in the repository (the account's own dot-files left out)."""
        return sorted(set(os.listdir(self.home)) - self.initial)

    def remove(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.call(['pkill', '-KILL', '-u', self.user])
        subprocess.call(['userdel', '--remove', self.user], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope='module')
def repo(home):
    """A Repository for the tests of one module, named in COCKER_HOME/ssh_config; the ssh_config
    and the saved srepo go with it."""
    r = Repository()
    config = os.path.join(home, 'ssh_config')
    with open(config, 'w') as f:
        f.write(r.ssh_config())
    yield r
    os.unlink(config)
    for name in ('srepo',):
        if os.path.exists(os.path.join(home, name)):
            os.unlink(os.path.join(home, name))
    r.remove()
