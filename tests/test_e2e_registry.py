"""cocker's own registry and cocker's registry client, against real clients and servers no
one here wrote: skopeo and podman against cocker's server (TLS with a CA made here, Basic
auth), cocker's client against cocker's server and the distribution registry
(docker-registry), all on 127.0.0.1."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from conftest import (cocker_process, free_loopback_port, run_cocker, wait_for)
from test_e2e_oci import (APP_CHECK, APP_SEEN, Buildah, base_files, check_app,  # noqa: F401
                          built, image_names, podman)   # (the last three: fixtures)

PASSWORDS = {'alice': 'alice-secret', 'bob': 'bob-secret'}


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    """A CA and a certificate of 127.0.0.1 signed by it: {'dir', 'ca', 'cert', 'key'};
    dir holds ca.crt alone (skopeo's and podman's --cert-dir)."""
    top = str(tmp_path_factory.mktemp('certs'))
    ca, ca_key = os.path.join(top, 'ca.pem'), os.path.join(top, 'ca.key')
    cert, key = os.path.join(top, 'server.pem'), os.path.join(top, 'server.key')
    ext = os.path.join(top, 'ext')
    with open(ext, 'w') as f:
        f.write('subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n')
    quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}
    subprocess.check_call(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout',
                           ca_key, '-out', ca, '-subj', '/CN=cocker test CA', '-days', '2'],
                          **quiet)
    subprocess.check_call(['openssl', 'req', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                           '-out', cert + '.csr', '-subj', '/CN=127.0.0.1'], **quiet)
    subprocess.check_call(['openssl', 'x509', '-req', '-in', cert + '.csr', '-CA', ca, '-CAkey',
                           ca_key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile',
                           ext], **quiet)
    cert_dir = os.path.join(top, 'certdir')
    os.mkdir(cert_dir)
    shutil.copy(ca, os.path.join(cert_dir, 'ca.crt'))
    return {'dir': cert_dir, 'ca': ca, 'ca_key': ca_key, 'cert': cert, 'key': key}


STARTED = []                    #: every registry process started, for the cleanup below


@pytest.fixture(autouse=True)
def no_registry_left():
    """The registries a test started are gone after it, pass or fail."""
    before = len(STARTED)
    yield
    for server in STARTED[before:]:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()
    del STARTED[before:]


class Server(object):
    """A registry process on 127.0.0.1:port; listening() waits for it, stop() ends it."""

    def __init__(self, argv, port, env=None, home=None):
        self.port, self.address = port, '127.0.0.1:%d' % port
        if home is not None:
            self.proc = cocker_process(home, *argv)
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=env)
        STARTED.append(self)
        import socket

        def up():
            assert self.proc.poll() is None, 'the registry ended: %r' % (
                self.proc.communicate(timeout=5),)
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(up, timeout=20, what='the registry on port %d' % port)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode('utf-8', 'replace')


def cocker_registry(home, certs, repo_dir, port=None, extra=(), tls=True):
    """cocker -a repo_server on 127.0.0.1 (TLS with the test CA's certificate, unless
    not tls: then plain HTTP)."""
    port = port or free_loopback_port()
    serving = ['--tls-cert', certs['cert'], '--tls-key', certs['key']] if tls else ['--insecure']
    return Server(['-a', 'repo_server', '--listen', '127.0.0.1:%d' % port, '--repo-dir',
                   repo_dir] + serving + list(extra), port, home=home)


@pytest.fixture(scope='module')
def ours(home, certs, tmp_path_factory):
    """cocker's registry with TLS and two users: alice pushes, bob pulls."""
    repo_dir = str(tmp_path_factory.mktemp('registry'))
    for user, rights in (('alice', 'push'), ('bob', 'pull')):
        r = run_cocker(home, '-a', 'repo_user_add', '--user', user, '--rights', rights,
                       '--repo-dir', repo_dir, input=(PASSWORDS[user] + '\n').encode())
        assert r.rc == 0, r
    server = cocker_registry(home, certs, repo_dir)
    server.dir = repo_dir
    yield server
    rc, err = server.stop()
    assert rc == 0, err
    assert '"GET /v2/" 200' in open(os.path.join(repo_dir, 'access.log')).read()


@pytest.fixture
def second_home():
    """Another COCKER_HOME (a second host), removed afterwards with what it made."""
    path = tempfile.mkdtemp(prefix='cocker-test2-')
    yield path
    for name in os.listdir(os.path.join(path, 'containers')) if os.path.isdir(
            os.path.join(path, 'containers')) else []:
        if not name.startswith('.'):
            run_cocker(path, '-a', 'destroy', '-c', name, '-h', '-f')
    assert not [l for l in open('/proc/mounts') if path in l]
    shutil.rmtree(path)


def login(home, server, user, certs, password=None):
    return run_cocker(home, '-a', 'login', '--repo', server.address, '--user', user,
                      '--ca-file', certs['ca'], input=((password or PASSWORDS[user]) +
                                                       '\n').encode())


def stored_image(home, name, version):
    """(the files of each layer, config) of an image in a store."""
    d = os.path.join(home, 'images', name, version)
    layers = open(os.path.join(d, 'layers')).read().split()
    return [tree_listing(os.path.join(home, 'layers', l.split(':')[1], 'rlayer'))
            for l in layers], json.load(open(os.path.join(d, 'config.json')))


def tree_listing(root):
    """Every entry under root: path, mode, owner, link target or content digest, xattrs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in sorted(dirnames + filenames):
            path = os.path.join(dirpath, entry)
            st = os.lstat(path)
            if os.path.islink(path):
                what = os.readlink(path)
            elif os.path.isfile(path):
                what = hashlib.sha256(open(path, 'rb').read()).hexdigest()
            else:
                what = st.st_rdev
            found.append((os.path.relpath(path, root), st.st_mode, st.st_uid, st.st_gid,
                          what, sorted(os.listxattr(path, follow_symlinks=False))))
    return sorted(found)


def test_skopeo_and_podman_use_our_registry_and_cocker_pushes_and_pulls(
        ours, certs, built, cocker, home, names, image_names, podman, second_home):
    ref = '%s/team/app:2' % ours.address
    tls = ['--dest-cert-dir', certs['dir']]
    r = subprocess.run(['skopeo', 'copy', '-q'] + tls + ['--dest-creds', 'bob:bob-secret',
                       'docker-archive:' + built['docker'], 'docker://' + ref], stderr=subprocess.PIPE)
    assert r.returncode != 0 and b'denied' in r.stderr, 'bob may only pull'
    subprocess.check_call(['skopeo', 'copy', '-q'] + tls + ['--dest-creds', 'alice:alice-secret',
                                                            'docker-archive:' + built['docker'],
                                                            'docker://' + ref])
    inspected = json.loads(subprocess.check_output(
        ['skopeo', 'inspect', '--cert-dir', certs['dir'], '--creds', 'bob:bob-secret',
         'docker://' + ref]))
    assert len(inspected['Layers']) == 2, inspected
    podman('pull', '-q', '--cert-dir', certs['dir'], '--creds', 'bob:bob-secret', ref)
    assert podman.run(ref, '/bin/sh', '-c', APP_CHECK) == APP_SEEN
    # cocker's client: a wrong password, then alice's
    r = login(home, ours, 'alice', certs, 'wrong')
    assert r.rc == 255 and len(r.err.splitlines()) == 1 and '401' in r.err, r
    assert login(home, ours, 'alice', certs).rc == 0
    assert oct(os.stat(os.path.join(home, 'auth.json')).st_mode & 0o777) == '0o600'
    name = image_names()
    r = cocker('-a', 'pull', '-m', 'team/app:2', '--repo', ours.address, '--ca-file',
               certs['ca'], '--to-image', name + ':2')
    assert r.rc == 0 and r.out == 'OK\n', r
    check_app(cocker, names, name + ':2')
    r = cocker('-a', 'push', '-m', name + ':2', '--repo', ours.address + '/mine', '--ca-file',
               certs['ca'])
    assert r.rc == 0, r
    # a second host, its CA where podman's users put it: bob pulls what alice pushed;
    # the same files and config, and it boots
    os.makedirs(os.path.join(second_home, 'certs.d', ours.address))
    shutil.copy(certs['ca'], os.path.join(second_home, 'certs.d', ours.address, 'ca.crt'))
    assert login(second_home, ours, 'bob', certs).rc == 0
    r = run_cocker(second_home, '-a', 'pull', '-m', '%s/mine/%s:2' % (ours.address, name))
    assert r.rc == 0, r
    assert stored_image(second_home, name, '2')[0] == stored_image(home, name, '2')[0]
    assert stored_image(second_home, name, '2')[1]['config'] == \
        stored_image(home, name, '2')[1]['config']
    check_app(lambda *a: run_cocker(second_home, *a), names, name + ':2')
    r = cocker('-s', 'search', '--repo', ours.address, '--ca-file', certs['ca'])
    rows = [l.split() for l in r.out.splitlines()[2:]]
    assert r.rc == 0 and ['team/app', '2'] in rows and ['mine/%s' % name, '2'] in rows, r
    r = cocker('-s', 'search', '--match', 'team', '--ca-file', certs['ca'])
    assert r.rc == 0 and [l.split() for l in r.out.splitlines()[2:]] == [['team/app', '2']], \
        'the --repo given last is remembered: %r' % (r,)


def error_line(r):
    """The one error line of a failed command (progress lines of each layer may precede)."""
    errors = [l for l in r.err.splitlines() if l.startswith('*** ERROR')]
    assert len(errors) == 1 and r.err.splitlines()[-1] == errors[0], r
    return errors[0]


def test_registry_errors_are_one_clear_line(ours, certs, built, cocker, home, image_names,
                                           second_home):
    assert login(home, ours, 'alice', certs).rc == 0
    base = ['--repo', ours.address, '--ca-file', certs['ca']]
    mine = image_names()
    assert cocker('-a', 'import', '--image-file', built['docker'], '-m', mine + ':1').rc == 0
    assert cocker('-a', 'push', '-m', mine + ':1', *base).rc == 0
    for what, image, text in (
            ('an unknown tag', mine + ':nope', '404 manifest unknown'),
            ('an unknown repository', 'nobody/here:1', '404 manifest unknown'),
            ('a name with ..', '../app:1', 'not a valid repository name')):
        r = cocker('-a', 'pull', '-m', image, '--to-image', image_names() + ':1', *base)
        assert r.rc == 255 and len(r.err.splitlines()) == 1 and text in r.err, (what, r)
    # no credentials, then bob's, who may only pull
    r = run_cocker(second_home, '-a', 'push', '-m', 'x', *base)
    assert r.rc == 255 and "image 'x' not found" in r.err, r
    assert run_cocker(second_home, '-a', 'import', '--image-file', built['docker'], '-m', 'x:1').rc == 0
    r = run_cocker(second_home, '-a', 'push', '-m', 'x:1', *base)
    assert r.rc == 255 and len(r.err.splitlines()) == 1 and '401' in r.err, r
    assert login(second_home, ours, 'bob', certs).rc == 0
    r = run_cocker(second_home, '-a', 'push', '-m', 'x:1', *base)
    assert r.rc == 255 and len(r.err.splitlines()) == 1 and '403 denied' in r.err, r
    assert run_cocker(second_home, '-a', 'del_image', '-m', 'x:1').rc == 0
    # a blob whose bytes are not its digest (the registry's disk corrupted): refused
    blobs = os.path.join(ours.dir, 'blobs', 'sha256')
    biggest = max(os.listdir(blobs), key=lambda b: os.path.getsize(os.path.join(blobs, b)))
    path = os.path.join(blobs, biggest)
    data = open(path, 'rb').read()
    try:
        with open(path, 'wb') as f:
            f.write(data[:-1] + bytes([data[-1] ^ 1]))
        r = run_cocker(second_home, '-a', 'pull', '-m', mine + ':1', *base)
        assert r.rc == 255 and 'digest mismatch for blob sha256:' + biggest in error_line(r), r
    finally:
        with open(path, 'wb') as f:
            f.write(data)
    assert os.listdir(os.path.join(second_home, 'layers')) == [], 'no layer kept'
    assert not os.path.exists(os.path.join(second_home, 'images', mine))
    assert [e for e in os.listdir(os.path.join(second_home, 'downloads'))] == []
    r = run_cocker(second_home, '-a', 'pull', '-m', mine + ':1', *base)
    assert r.rc == 0, 'the registry mended, the pull goes through: %r' % (r,)


# ---- the distribution registry, with htpasswd and with token authentication -------------

def distribution(tmp, certs, auth, port=None):
    """docker-registry on 127.0.0.1 with TLS, storage in tmp, auth the config's auth part."""
    if shutil.which('docker-registry') is None:
        pytest.fail('docker-registry is missing: tests/run.sh installs it')
    port = port or free_loopback_port()
    config = os.path.join(tmp, 'config.yml')
    with open(config, 'w') as f:
        f.write('version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n'
                '    rootdirectory: %s\n  delete:\n    enabled: true\n'
                'http:\n  addr: 127.0.0.1:%d\n  tls:\n    certificate: %s\n    key: %s\n'
                'auth:\n%s' % (os.path.join(tmp, 'storage'), port, certs['cert'], certs['key'],
                                auth))
    return Server(['docker-registry', 'serve', config], port)


@pytest.fixture(scope='module')
def htpasswd_registry(certs, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp('distribution'))
    users = os.path.join(tmp, 'htpasswd')
    with open(users, 'wb') as f:
        f.write(subprocess.check_output(['htpasswd', '-Bbn', 'alice', PASSWORDS['alice']]))
    server = distribution(tmp, certs, '  htpasswd:\n    realm: test\n    path: %s\n' % users)
    yield server
    server.stop()


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


class TokenService(object):
    """Docker's token protocol on https://127.0.0.1: alice, with her password, gets every
    scope she asks for in an RS256 token signed by the CA's key (its certificate in x5c)."""

    def __init__(self, certs):
        import http.server
        import threading
        self.certs, self.issued = certs, []
        der = subprocess.check_output(['openssl', 'x509', '-in', certs['ca'], '-outform', 'DER'])
        import base64
        self.x5c = base64.b64encode(der).decode()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                import urllib.parse
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                expected = 'Basic ' + base64.b64encode(
                    ('alice:' + PASSWORDS['alice']).encode()).decode()
                if self.headers.get('Authorization') != expected:
                    self.send_response(401)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                body = json.dumps({'token': service.token(query.get('scope', []))}).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        import ssl
        self.server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs['cert'], certs['key'])
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.realm = 'https://127.0.0.1:%d/token' % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.daemon = True
        self.thread.start()

    def token(self, scopes):
        import time
        import uuid
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(':')[0], ':'.join(scope.split(':')[1:-1]), \
                scope.split(':')[-1]
            access.append({'type': kind, 'name': name, 'actions': actions.split(',')})
        now = int(time.time())
        head = b64url(json.dumps({'typ': 'JWT', 'alg': 'RS256', 'x5c': [self.x5c]}).encode())
        claims = b64url(json.dumps({'iss': 'cocker-test', 'sub': 'alice', 'aud': 'test-registry',
                                    'exp': now + 300, 'nbf': now - 10, 'iat': now,
                                    'jti': uuid.uuid4().hex, 'access': access}).encode())
        signed = subprocess.run(['openssl', 'dgst', '-sha256', '-sign', self.certs['ca_key']],
                                input=('%s.%s' % (head, claims)).encode(),
                                stdout=subprocess.PIPE, check=True).stdout
        self.issued.append(scopes)
        return '%s.%s.%s' % (head, claims, b64url(signed))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope='module')
def token_registry(certs, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp('distribution-token'))
    tokens = TokenService(certs)
    server = distribution(tmp, certs, '  token:\n    realm: %s\n    service: test-registry\n'
                          '    issuer: cocker-test\n    rootcertbundle: %s\n'
                          % (tokens.realm, certs['ca']))
    server.tokens = tokens
    yield server
    server.stop()
    tokens.close()


def test_the_distribution_registry_with_htpasswd_and_with_tokens(
        htpasswd_registry, token_registry, certs, built, cocker, home, names, image_names):
    name = image_names()
    assert cocker('-a', 'import', '--image-file', built['docker'], '-m', name + ':1').rc == 0
    for server in (htpasswd_registry, token_registry):
        base = ['--repo', server.address + '/team', '--ca-file', certs['ca']]
        r = cocker('-a', 'push', '-m', name + ':1', *base)
        assert r.rc == 255 and '401' in error_line(r), 'not logged in yet: %r' % (r,)
        assert login(home, server, 'alice', certs).rc == 0
        r = cocker('-a', 'push', '-m', name + ':1', *base)
        assert r.rc == 0, r
        r = cocker('-a', 'push', '-m', name + ':1', '--format', 'oci', '--repo',
                   server.address + '/oci', '--ca-file', certs['ca'])
        assert r.rc == 0 and 'the registry has it' in r.err, 'mounted, or there: %r' % (r,)
        r = cocker('-s', 'search', '--match', name, *base)
        assert r.rc == 0 and [l.split() for l in r.out.splitlines()[2:]] == [[name, '1']], r
        back = image_names()
        r = cocker('-a', 'pull', '-m', '%s:1' % name, '--to-image', back + ':1', *base)
        assert r.rc == 0, r
        check_app(cocker, names, back + ':1')
        manifest = json.loads(subprocess.check_output(
            ['skopeo', 'inspect', '--raw', '--cert-dir', certs['dir'], '--creds',
             'alice:' + PASSWORDS['alice'], 'docker://%s/oci/%s:1' % (server.address, name)]))
        assert manifest['mediaType'] == 'application/vnd.oci.image.manifest.v1+json'
    assert any(s and s[0] == 'repository:team/%s:pull,push' % name
               for s in token_registry.tokens.issued), token_registry.tokens.issued


def test_a_pull_of_an_index_takes_the_host_platform(htpasswd_registry, ours, certs, home,
                                                   cocker, image_names, tmp_path):
    """An index of two images (amd64 and arm64, told apart by a file), pushed by buildah to
    the distribution registry and to cocker's (which keeps it byte for byte)."""
    b = Buildah(str(tmp_path / 'b'))

    def marked(arch):
        def change(root):
            base_files(root)
            with open(os.path.join(root, 'etc', 'arch'), 'w') as f:
                f.write(arch + '\n')
        return change
    name = image_names()
    refs = ['%s/multi/%s:1' % (server.address, name) for server in (htpasswd_registry, ours)]
    try:
        b.layer('scratch', marked('amd64'), 'one:amd64')
        b.layer('scratch', marked('arm64'), 'one:arm64')
        b('manifest', 'create', 'multi')
        b('manifest', 'add', '--arch', 'arm64', 'multi', 'containers-storage:localhost/one:arm64')
        b('manifest', 'add', '--arch', 'amd64', 'multi', 'containers-storage:localhost/one:amd64')
        for ref in refs:
            b('manifest', 'push', '-q', '--all', '--cert-dir', certs['dir'], '--creds',
              'alice:' + PASSWORDS['alice'], 'multi', 'docker://' + ref)
    finally:
        b.close()
    raw = [subprocess.check_output(['skopeo', 'inspect', '--raw', '--cert-dir', certs['dir'],
                                    '--creds', 'alice:' + PASSWORDS['alice'], 'docker://' + ref])
           for ref in refs]
    assert raw[0] == raw[1] and b'"manifests"' in raw[0], 'the index, byte for byte'
    for server, ref in zip((htpasswd_registry, ours), refs):
        assert login(home, server, 'alice', certs).rc == 0
        for platform, local, arch in ((None, image_names(), 'amd64'),
                                      ('linux/arm64', image_names(), 'arm64')):
            extra = ['--platform', platform] if platform else []
            r = cocker('-a', 'pull', '-m', ref, '--to-image', local + ':1', '--ca-file',
                       certs['ca'], *extra)
            assert r.rc == 0, r
            layers = open(os.path.join(home, 'images', local, '1', 'layers')).read().split()
            stored = os.path.join(home, 'layers', layers[0].split(':')[1], 'rlayer', 'etc',
                                  'arch')
            assert open(stored).read() == arch + '\n', platform
        r = cocker('-a', 'pull', '-m', ref, '--to-image', image_names() + ':1', '--ca-file',
                   certs['ca'], '--platform', 'linux/s390x')
        assert r.rc == 255 and 'no image for linux/s390x (there are linux/amd64, ' \
            'linux/arm64)' in error_line(r), r
    # by digest: the index's own
    digest = 'sha256:' + hashlib.sha256(raw[1]).hexdigest()
    local = image_names()
    r = cocker('-a', 'pull', '-m', '%s/multi/%s@%s' % (ours.address, name, digest),
               '--to-image', local + ':1', '--ca-file', certs['ca'])
    assert r.rc == 0, r


def test_anonymous_pull_read_only_delete_and_garbage_collection(certs, cocker, home, built,
                                                                image_names, tmp_path):
    repo_dir = str(tmp_path / 'repo')
    name = image_names()
    assert cocker('-a', 'import', '--image-file', built['docker'], '-m', name + ':1').rc == 0
    users = os.path.join(repo_dir, 'users')
    os.makedirs(repo_dir)
    assert run_cocker(home, '-a', 'repo_user_add', '--user', 'alice', '--rights', 'push',
                      '--auth-file', users, input=b'pw\n').rc == 0
    r = cocker('-s', 'repo_users', '--repo-dir', repo_dir)
    assert r.rc == 0 and [l.split() for l in r.out.splitlines()[2:]] == [['alice', 'push']], r
    server = cocker_registry(home, certs, repo_dir, extra=['--insecure', '--anonymous-pull'])
    creds = ['--creds', 'alice:pw', '--tls-verify=false']
    try:
        ref = 'docker://%s/anon/%s:1' % (server.address, name)
        subprocess.check_call(['skopeo', 'copy', '-q', '--dest-creds', 'alice:pw',
                               '--dest-tls-verify=false', 'docker-archive:' + built['docker'], ref])
        # anyone may pull, nobody without credentials may push
        assert json.loads(subprocess.check_output(['skopeo', 'inspect', '--tls-verify=false',
                                                   '--no-creds', ref]))['Name']
        r = subprocess.run(['skopeo', 'copy', '-q', '--dest-tls-verify=false', '--dest-no-creds',
                            'docker-archive:' + built['docker'], ref.replace(':1', ':2')],
                           stderr=subprocess.PIPE)
        assert r.returncode != 0, 'an anonymous push'
        # a deleted image: its blobs go at the next collection once old enough
        subprocess.check_call(['skopeo', 'delete'] + creds + [ref])
        r = subprocess.run(['skopeo', 'inspect'] + creds + [ref], stderr=subprocess.PIPE)
        assert r.returncode != 0 and b'manifest unknown' in r.stderr
        blobs = os.path.join(repo_dir, 'blobs', 'sha256')
        assert cocker('-a', 'repo_gc', '--repo-dir', repo_dir).out.startswith('removed 0 ')
        for entry in os.listdir(blobs):                  # an hour and more ago
            os.utime(os.path.join(blobs, entry), (1, 1))
        r = cocker('-a', 'repo_gc', '--repo-dir', repo_dir)
        assert r.rc == 0 and r.out.startswith('removed 4 blobs'), r     # 2 layers, config, manifest
        assert os.listdir(blobs) == []
    finally:
        assert server.stop()[0] == 0
    # read-only: pulls only
    server = cocker_registry(home, certs, repo_dir, extra=['--insecure', '--read-only'])
    ref = 'docker://%s/anon/%s:1' % (server.address, name)
    try:
        r = subprocess.run(['skopeo', 'copy', '-q', '--dest-tls-verify=false', '--dest-creds',
                            'alice:pw', 'docker-archive:' + built['docker'], ref], stderr=subprocess.PIPE)
        assert r.returncode != 0 and b'read-only' in r.stderr, r.stderr
    finally:
        assert server.stop()[0] == 0


class Misbehaving(object):
    """A registry on 127.0.0.1 that answers from a table (path -> (status, headers, body)),
    and notes every request's headers; unknown paths are 404."""

    def __init__(self, table):
        import http.server
        import threading
        self.table, self.seen = table, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                outer.seen.append((self.path, dict(self.headers)))
                status, headers, body = outer.table.get(self.path, (404, {}, b'{}'))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_HEAD = do_GET

            def log_message(self, *args):
                pass
        import socketserver

        class Threading(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True       # (clients keep connections open: one thread each)
        self.server = Threading(('127.0.0.1', 0), Handler)
        self.address = '127.0.0.1:%d' % self.server.server_address[1]
        t = threading.Thread(target=self.server.serve_forever)
        t.daemon = True
        t.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_blob_redirect_gets_no_credentials_and_bad_blobs_are_refused(cocker, home,
                                                                       image_names, second_home):
    """A registry sends the layer to blob storage on another port: the Authorization header
    stays home; a layer whose bytes differ, a redirect to file://, each refused."""
    import base64
    import gzip
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w') as t:
        info = tarfile.TarInfo('hello')
        info.size = 3
        t.addfile(info, io.BytesIO(b'hi\n'))
    layer = gzip.compress(raw.getvalue())
    digest = lambda data: 'sha256:' + hashlib.sha256(data).hexdigest()
    config = json.dumps({'architecture': 'amd64', 'os': 'linux', 'rootfs': {
        'type': 'layers', 'diff_ids': [digest(raw.getvalue())]}}).encode()
    storage = Misbehaving({'/blob': (200, {}, layer),
                           '/bad': (200, {}, layer[:-1] + bytes([layer[-1] ^ 1])),
                           '/long': (200, {}, layer + b'x' * 100000)})
    registry = Misbehaving({})
    try:
        def manifest(location):
            body = json.dumps({'schemaVersion': 2, 'mediaType':
                               'application/vnd.oci.image.manifest.v1+json',
                               'config': {'digest': digest(config), 'size': len(config)},
                               'layers': [{'digest': digest(layer), 'size': len(layer)}]}).encode()
            return body
        need = {'WWW-Authenticate': 'Basic realm="x"'}
        auth = 'Basic ' + base64.b64encode(b'u:p').decode()
        registry.table.update({
            '/v2/': (200, {}, b'{}'),
            '/v2/a/manifests/good': (200, {'Content-Type': 'application/vnd.oci.image.manifest'
                                           '.v1+json'}, manifest('/blob')),
            '/v2/a/blobs/' + digest(config): (200, {}, config),
            '/v2/a/blobs/' + digest(layer): (307, {'Location': 'http://%s/blob' % storage.address},
                                             b'')})
        with open(os.path.join(second_home, 'auth.json'), 'w') as f:
            json.dump({'auths': {registry.address: {'auth': auth[6:]}}}, f)
        del need
        r = run_cocker(second_home, '-a', 'pull', '-m', '%s/a:good' % registry.address,
                       '--insecure', '--to-image', 'good:1')
        assert r.rc == 0, r
        assert storage.seen and all('Authorization' not in h for _, h in storage.seen), \
            'credentials went to the blob storage: %r' % storage.seen
        assert run_cocker(second_home, '-a', 'del_image', '-m', 'good:1').rc == 0
        # the storage sends other bytes, then more bytes than the manifest says
        for path, text in (('/bad', 'digest mismatch'), ('/long', 'larger than its manifest')):
            registry.table['/v2/a/blobs/' + digest(layer)] = (
                307, {'Location': 'http://%s%s' % (storage.address, path)}, b'')
            r = run_cocker(second_home, '-a', 'pull', '-m', '%s/a:good' % registry.address,
                           '--insecure', '--to-image', 'bad:1')
            assert r.rc == 255 and text in error_line(r), r
        # a redirect to a host file
        registry.table['/v2/a/blobs/' + digest(layer)] = (307, {'Location': 'file:///etc/passwd'},
                                                         b'')
        r = run_cocker(second_home, '-a', 'pull', '-m', '%s/a:good' % registry.address,
                       '--insecure', '--to-image', 'file:1')
        assert r.rc == 255 and 'refused' in error_line(r), r
        assert os.listdir(os.path.join(second_home, 'images')) == []
        assert os.listdir(os.path.join(second_home, 'layers')) == []
    finally:
        storage.close()
        registry.close()


# ---- faults: kills, a full disk, many clients at once ------------------------------------

class SlowProxy(object):
    """A TCP relay 127.0.0.1:port -> target at about rate bytes a second each way, so a
    transfer lasts long enough to be cut in the middle."""

    def __init__(self, target_port, rate=8 << 20):
        import socket
        import threading
        self.target_port, self.rate = target_port, rate
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.address = '127.0.0.1:%d' % self.port
        self.open = []
        t = threading.Thread(target=self.accept)
        t.daemon = True
        t.start()

    def accept(self):
        import socket
        import threading
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(('127.0.0.1', self.target_port))
            except OSError:
                client.close()
                continue
            self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                t = threading.Thread(target=self.pipe, args=(a, b))
                t.daemon = True
                t.start()

    def pipe(self, source, sink):
        import time
        try:
            while True:
                data = source.recv(64 << 10)
                if not data:
                    break
                sink.sendall(data)
                time.sleep(len(data) / float(self.rate))
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(2)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for s in self.open:
            s.close()


def random_image(cocker, tmp_path, name, megabytes):
    """A cockerimage of one file of random bytes (nothing to compress), imported as name."""
    import tarfile
    tree = tmp_path / ('tree-' + name)
    tree.mkdir()
    with open(str(tree / 'random'), 'wb') as f:
        f.write(os.urandom(megabytes << 20))
    archive = str(tmp_path / (name + '.cockerimage'))
    with tarfile.open(archive, 'w:gz', compresslevel=1) as t:
        t.add(str(tree / 'random'), 'random')
    r = cocker('-a', 'import', '--image-file', archive, '-m', name)
    assert r.rc == 0, r
    return hashlib.sha256(open(str(tree / 'random'), 'rb').read()).hexdigest()


def blobs_are_whole(repo_dir):
    blobs = os.path.join(repo_dir, 'blobs', 'sha256')
    for entry in os.listdir(blobs):
        with open(os.path.join(blobs, entry), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry, 'a partial blob is served'


def test_a_registry_killed_mid_upload_serves_no_partial_blob_and_the_push_completes(
        certs, cocker, home, image_names, tmp_path, second_home):
    repo_dir = str(tmp_path / 'repo')
    server = cocker_registry(home, certs, repo_dir)        # TLS, not verified: --insecure
    proxy = SlowProxy(server.port)
    name = image_names()
    digest = random_image(cocker, tmp_path, name, 48)
    push = cocker_process(home, '-a', 'push', '-m', name, '--repo', proxy.address,
                          '--insecure')
    uploads = os.path.join(repo_dir, 'uploads')
    try:
        wait_for(lambda: any(os.path.getsize(os.path.join(uploads, e)) > (4 << 20)
                             for e in os.listdir(uploads) if not e.endswith('.name')),
                 timeout=60, what='the upload to be under way')
        server.proc.kill()                              # kill -9 in the middle of the blob
        server.stop()
        blobs_are_whole(repo_dir)
        server = cocker_registry(home, certs, repo_dir, port=server.port)
        out, err = push.communicate(timeout=120)
        assert push.returncode == 0, err
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
        proxy.close()
    blobs_are_whole(repo_dir)
    # the image is whole in the registry: a pull on a second host has the same bytes
    r = run_cocker(second_home, '-a', 'pull', '-m', '%s/%s:latest' % (server.address, name),
                   '--to-image', 'back:1', '--insecure')
    assert r.rc == 0, r
    layer = open(os.path.join(second_home, 'images', 'back', '1', 'layers')).read().split()
    stored = os.path.join(second_home, 'layers', layer[0].split(':')[1], 'rlayer', 'random')
    assert hashlib.sha256(open(stored, 'rb').read()).hexdigest() == digest
    # a garbage collection keeps what manifests need, and a fresh upload
    r = cocker('-a', 'repo_gc', '--repo-dir', repo_dir)
    assert r.rc == 0 and r.out.startswith('removed 0 blobs'), r
    assert server.stop()[0] == 0


def test_a_pull_killed_midway_resumes_and_leaves_no_half_image(certs, cocker, home,
                                                               image_names, tmp_path,
                                                               second_home):
    repo_dir = str(tmp_path / 'repo')
    server = cocker_registry(home, certs, repo_dir, extra=['--insecure'])
    proxy = SlowProxy(server.port)
    name = image_names()
    digest = random_image(cocker, tmp_path, name, 32)
    try:
        assert cocker('-a', 'push', '-m', name, '--repo', server.address, '--insecure').rc == 0
        pull = cocker_process(second_home, '-a', 'pull', '-m', '%s/%s' % (proxy.address, name),
                              '--insecure')
        downloads = os.path.join(second_home, 'downloads')
        wait_for(lambda: os.path.isdir(downloads) and any(
            os.path.getsize(os.path.join(downloads, e)) > (4 << 20)
            for e in os.listdir(downloads)), timeout=60, what='the download to be under way')
        pull.kill()
        pull.communicate()
        r = run_cocker(second_home, '-s', 'images')
        assert r.rc == 0 and name not in r.out, 'no half image'
        partial = [e for e in os.listdir(downloads) if e.endswith('.part')]
        assert len(partial) == 1, os.listdir(downloads)
        r = run_cocker(second_home, '-a', 'pull', '-m', '%s/%s' % (server.address, name),
                       '--insecure')
        assert r.rc == 0, r
    finally:
        proxy.close()
    log = open(os.path.join(repo_dir, 'access.log')).read()
    assert '"GET /v2/%s/blobs/sha256:' % name in log and '" 206 ' in log, 'resumed with Range'
    layer = open(os.path.join(second_home, 'images', name, 'latest', 'layers')).read().split()
    stored = os.path.join(second_home, 'layers', layer[0].split(':')[1], 'rlayer', 'random')
    assert hashlib.sha256(open(stored, 'rb').read()).hexdigest() == digest
    assert os.listdir(downloads) == [], 'the download went once installed'
    assert server.stop()[0] == 0


def test_a_full_registry_disk_fails_that_upload_only(certs, cocker, home, image_names,
                                                     tmp_path):
    repo_dir = str(tmp_path / 'small')
    os.mkdir(repo_dir)
    subprocess.check_call(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', repo_dir])
    try:
        server = cocker_registry(home, certs, repo_dir, extra=['--insecure'])
        big, small = image_names(), image_names()
        random_image(cocker, tmp_path, big, 40)
        random_image(cocker, tmp_path, small, 1)
        r = cocker('-a', 'push', '-m', big, '--repo', server.address, '--insecure')
        assert r.rc == 255 and '507' in error_line(r) and 'no space left' in error_line(r), r
        assert [e for e in os.listdir(os.path.join(repo_dir, 'uploads'))] == [], \
            'the failed upload is gone'
        r = cocker('-a', 'push', '-m', small, '--repo', server.address, '--insecure')
        assert r.rc == 0, 'the registry goes on serving: %r' % (r,)
        assert server.stop()[0] == 0
    finally:
        subprocess.call(['umount', repo_dir])


def test_many_clients_at_once(ours, certs, built, cocker, home, image_names):
    assert login(home, ours, 'alice', certs).rc == 0
    base = ['--ca-file', certs['ca']]
    name = image_names()
    assert cocker('-a', 'import', '--image-file', built['docker'], '-m', name + ':1').rc == 0
    assert cocker('-a', 'push', '-m', name + ':1', '--repo', ours.address + '/many', *base).rc == 0
    pulled = [image_names() for _ in range(8)]
    procs = [cocker_process(home, '-a', 'pull', '-m', '%s/many/%s:1' % (ours.address, name),
                            '--to-image', p + ':1', *base) for p in pulled]
    procs += [cocker_process(home, '-a', 'push', '-m', name + ':1', '--repo',
                             '%s/push%d' % (ours.address, n), *base) for n in range(4)]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    layers = open(os.path.join(home, 'images', name, '1', 'layers')).read()
    for p in pulled:
        r = cocker('-s', 'image_info', '-m', p + ':1')
        assert r.rc == 0 and len([l for l in r.out.splitlines() if l.startswith(
            'layer: sha256:')]) == len(layers.split()), r
    r = cocker('-s', 'search', '--repo', ours.address, '--match', 'push', *base)
    assert sorted(l.split()[0] for l in r.out.splitlines()[2:]) == \
        ['push%d/%s' % (n, name) for n in range(4)], r
    blobs_are_whole(ours.dir)


def raw_request(address, data, timeout=10):
    """Send bytes to the registry, return all it answers until it closes (or goes quiet)."""
    import socket
    host, port = address.split(':')
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(data)
        out = b''
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def test_hostile_clients_get_errors_and_the_blobs_stay_whole(certs, home, tmp_path):
    """What a client with push rights (here: no users, an open registry) may try."""
    import http.client
    repo_dir = str(tmp_path / 'repo')
    server = cocker_registry(home, certs, repo_dir, tls=False)
    host, port = server.address.split(':')

    def request(method, path, body=None, headers=None):
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data
    try:
        blob = os.urandom(2000)
        digest = 'sha256:' + hashlib.sha256(blob).hexdigest()
        status, headers, _ = request('POST', '/v2/victim/app/blobs/uploads/?digest=' + digest,
                                     blob)
        assert status == 201
        # an upload raced by a second request on the same upload id: the blob stays whole
        status, headers, _ = request('POST', '/v2/evil/x/blobs/uploads/')
        location = headers['Location']
        import socket
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b'PATCH %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n'
                     % location.encode())
        upload = location.split('?')[0].rstrip('/').split('/')[-1]
        held = os.path.join(repo_dir, 'uploads', upload)

        def held_by_the_patch():        # (the server locks the upload while it appends)
            import fcntl
            with open(held, 'rb') as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
            return False
        wait_for(held_by_the_patch, what='the slow PATCH to hold the upload')
        import threading
        done = []
        t = threading.Thread(target=lambda: done.append(request(
            'PUT', location + '?digest=' + digest, blob)))
        t.start()
        t.join(2)
        slow.sendall(b'G' * 100)
        slow.recv(4096)
        slow.close()
        t.join(10)
        assert done and done[0][0] in (400, 404), 'the PUT waited, then the upload had more'
        assert open(os.path.join(repo_dir, 'blobs', 'sha256', digest[7:]), 'rb').read() == blob
        # an index whose child names a host file
        status, _, _ = request('PUT', '/v2/evil/x/manifests/t', json.dumps({
            'schemaVersion': 2, 'mediaType': 'application/vnd.oci.image.index.v1+json',
            'manifests': [{'digest': '../' * 12 + 'etc/passwd'}]}).encode(),
            {'Content-Type': 'application/vnd.oci.image.index.v1+json'})
        assert status == 400
        # a manifest nested deep, a negative chunk size, a bad Content-Length, a bad Range
        status, _, _ = request('PUT', '/v2/evil/x/manifests/t', b'[' * 100000,
                               {'Content-Type': 'application/vnd.oci.image.manifest.v1+json'})
        assert status == 400
        status, headers, _ = request('POST', '/v2/evil/x/blobs/uploads/')
        answer = raw_request(server.address, b'PATCH %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:'
                             b' chunked\r\n\r\n-1\r\n' % headers['Location'].encode() +
                             b'x' * (1 << 20))
        assert answer.startswith(b'HTTP/1.1 400'), answer[:200]
        answer = raw_request(server.address, b'PUT /v2/evil/x/manifests/t HTTP/1.1\r\nHost: x'
                             b'\r\nContent-Length: abc\r\n\r\n')
        assert answer.startswith(b'HTTP/1.1 400'), answer[:200]
        status, _, _ = request('GET', '/v2/victim/app/blobs/' + digest, None,
                               {'Range': 'bytes=5-3'})
        assert status == 416
        status, _, data = request('GET', '/v2/victim/app/blobs/' + digest, None,
                                  {'Range': 'bytes=10-19'})
        assert status == 206 and data == blob[10:20]
        # a body on a GET is never taken for a request of its own
        smuggled = b'DELETE /v2/victim/app/blobs/%s HTTP/1.1\r\nHost: x\r\n\r\n' % \
            digest.encode()
        raw_request(server.address, b'GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n'
                    b'\r\n' % len(smuggled) + smuggled, timeout=2)
        assert request('HEAD', '/v2/victim/app/blobs/' + digest)[0] == 200
        # names that would leave the directory or meet cocker's own entries
        for path in ('/v2/../../etc/manifests/x', '/v2/a/_tags/manifests/x',
                     '/v2/%2e%2e/x/manifests/y', '/v2/a//b/manifests/x',
                     '/v2/a/manifests/..', '/v2/_blobs/x/tags/list'):
            assert request('GET', path)[0] in (400, 404), path
        status, _, data = request('GET', '/v2/victim/tags/list')
        assert status == 404, 'a parent path is no repository'
    finally:
        assert server.stop()[0] == 0
    blobs_are_whole(repo_dir)
