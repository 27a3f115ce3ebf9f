"""The ssh image repository against a real OpenSSH server started on 127.0.0.1 for these
tests: its own port, host key and a dedicated user with an authorized key, all removed at
the end.  cocker reaches it through COCKER_HOME/ssh_config (known host, identity)."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

SSHD = shutil.which('sshd') or '/usr/sbin/sshd'


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Repository(object):
    """sshd on 127.0.0.1:PORT and a user whose home is the repository."""

    def __init__(self):
        if not os.path.exists(SSHD):
            pytest.fail('sshd (openssh-server) is not installed: tests/run.sh installs it')
        self.dir = tempfile.mkdtemp(prefix='cocker-sshd-')
        self.user = 'ckr' + uuid.uuid4().hex[:8]
        self.home = os.path.join(self.dir, 'home')
        self.port = free_port()
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
        end = time.time() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > end or self.proc.poll() is not None:
                    raise AssertionError('sshd did not start on port %d' % self.port)
                time.sleep(0.05)

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


def test_push_search_pull(repo, cocker, test_image, names, home):
    image = 'rp' + uuid.uuid4().hex[:6]
    assert cocker('-a', 'copy_image', '--from-image', 'test', '--to-image', image + ':1.2').rc == 0
    r = cocker('-s', 'ssearch', '--srepo', repo.address)
    assert r.rc == 0 and r.out == '', 'an empty repository lists nothing: %r' % (r,)
    assert open(os.path.join(home, 'srepo')).read() == repo.address, 'saved for later'
    r = cocker('-a', 'spush', '-m', image + ':1.2')
    assert r.rc == 0 and r.out == 'OK\n', r
    archive = '%s:1.2.cockerimage' % image
    assert repo.files() == [archive, archive + '.sha256'], 'no temporary file left'
    assert subprocess.call(['sha256sum', '--quiet', '-c', archive + '.sha256'],
                           cwd=repo.home) == 0
    r = cocker('-a', 'spush', '-m', image + ':1.2')
    assert r.rc == 255 and 'exist in srepo' in r.err
    lines = cocker('-s', 'ssearch', '--match', image[2:]).out.splitlines()
    assert lines[0].split() == ['image_id', 'modify_datetime', 'size'] and lines[1] == '-' * 70
    assert lines[2].split()[0] == image + ':1.2' and 'T' in lines[2].split()[1]
    assert cocker('-s', 'ssearch', '--match', 'nomatch').out == ''
    # pull: refused over an existing image, then into an empty store slot
    r = cocker('-a', 'spull', '-m', image + ':1.2')
    assert r.rc == 255 and 'exist' in r.err
    assert cocker('-a', 'del_image', '-m', image + ':1.2').rc == 0
    r = cocker('-a', 'spull', '-m', image + ':1.2')
    assert r.rc == 0 and r.out == 'OK\n', r
    c = names('pulled')
    assert cocker('-a', 'create', '-m', image + ':1.2', '-c', c, '-b').rc == 0
    assert cocker('-a', 'run', '-c', c, '--cmd', 'cat /root/tpl.txt').rc == 0
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    # a damaged archive in the repository is refused by its sha256
    with open(os.path.join(repo.home, archive), 'r+b') as f:
        f.seek(100)
        f.write(b'\xff' * 16)
    assert cocker('-a', 'del_image', '-m', image + ':1.2').rc == 0
    r = cocker('-a', 'spull', '-m', image + ':1.2')
    assert r.rc == 255 and r.err.count('\n') == 1, r
    assert not os.path.exists(os.path.join(home, 'images', image))
    r = cocker('-a', 'spull', '-m', 'nosuch:9')
    assert r.rc == 255 and "image 'nosuch:9.cockerimage' not found in srepo" in r.err


def test_a_wrong_key_and_a_refused_connection_are_clear_errors(repo, cocker, test_image,
                                                               home):
    config = os.path.join(home, 'ssh_config')
    with open(config, 'w') as f:
        f.write(repo.ssh_config(key=repo.wrong_key))
    try:
        r = cocker('-s', 'ssearch', '--srepo', repo.address, timeout=60)
        assert r.rc == 255 and r.err.startswith('*** ERROR : ssh to %s@127.0.0.1 failed: '
                                                % repo.user), r
        assert 'Permission denied' in r.err and r.err.count('\n') == 1, r
    finally:
        with open(config, 'w') as f:
            f.write(repo.ssh_config())
    closed = '%s@127.0.0.1:%d' % (repo.user, free_port())
    r = cocker('-a', 'spush', '-m', 'test', '--srepo', closed, timeout=60)
    assert r.rc == 255 and 'Connection refused' in r.err and r.err.count('\n') == 1, r
    r = cocker('-s', 'ssearch', '--srepo', 'no-user-part')
    assert r.rc == 7 and 'USER@HOST[:PORT]' in r.err
    r = cocker('-s', 'ssearch', '--srepo', 'a@b;reboot')
    assert r.rc == 7
