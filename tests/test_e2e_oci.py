"""Images from the OCI world: archives that buildah (a tool no one here wrote) builds and
writes as docker-archive, oci-archive and an oci layout directory are imported, their
layers stored once, and booted; hostile archives are refused with nothing kept."""

import io
import json
import os
import shutil
import struct
import subprocess
import tarfile

import pytest

from conftest import unique_names

BUSYBOX = '/bin/busybox'
APPLETS = 'sh ls cat echo id pwd env sleep stat wc'.split()


class Buildah(object):
    """buildah with a storage of its own (overlay: it writes opaque whiteouts)."""

    def __init__(self, top):
        self.argv = ['buildah', '--root', os.path.join(top, 'root'),
                     '--runroot', os.path.join(top, 'run'), '--storage-driver', 'overlay']

    def __call__(self, *args):
        return subprocess.check_output(self.argv + list(args)).decode().strip()

    def layer(self, base, change, image):
        """A new image: base (an image, or scratch) with change(root) as one more layer."""
        c = self('from', base)
        root = self('mount', c)
        change(root)
        self('commit', '-q', c, image)
        self('umount', c)
        self('rm', c)

    def close(self):
        subprocess.call(self.argv + ['umount', '--all'], stdout=subprocess.DEVNULL)
        subprocess.call(self.argv + ['rm', '--all'], stdout=subprocess.DEVNULL)
        subprocess.call(self.argv + ['rmi', '--all', '--force'], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)


def base_files(root):
    for d in ('bin', 'etc', 'data/keep', 'opq'):
        os.makedirs(os.path.join(root, d))
    shutil.copy(BUSYBOX, os.path.join(root, 'bin', 'busybox'))
    for applet in APPLETS:
        os.symlink('busybox', os.path.join(root, 'bin', applet))
    for path, text in (('data/gone', 'one\n'), ('data/keep/k', 'keep\n'), ('opq/old', 'old\n')):
        with open(os.path.join(root, path), 'w') as f:
            f.write(text)


def app_files(root):
    os.unlink(os.path.join(root, 'data', 'gone'))           # a whiteout
    shutil.rmtree(os.path.join(root, 'opq'))                # an opaque directory
    os.mkdir(os.path.join(root, 'opq'))
    with open(os.path.join(root, 'opq', 'new'), 'w') as f:
        f.write('new\n')
    with open(os.path.join(root, 'etc', 'hello'), 'w') as f:
        f.write('hello\n')
    os.link(os.path.join(root, 'etc', 'hello'), os.path.join(root, 'etc', 'hardlink'))
    os.symlink('/etc/hello', os.path.join(root, 'etc', 'sym'))
    shutil.copy(BUSYBOX, os.path.join(root, 'bin', 'su2'))
    os.chmod(os.path.join(root, 'bin', 'su2'), 0o4755)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """{format: path} of an image 'app' (2 layers over busybox) and its base alone."""
    if shutil.which('buildah') is None:
        pytest.fail('buildah is missing: tests/run.sh installs it')
    top = str(tmp_path_factory.mktemp('buildah'))
    b = Buildah(top)
    try:
        b.layer('scratch', base_files, 'base:1')
        b.layer('base:1', app_files, 'app:2')
        out = {}
        for kind, target in (('docker', 'docker-archive:%s/app-docker.tar:app:2'),
                             ('oci', 'oci-archive:%s/app-oci.tar:app:2'),
                             ('ocidir', 'oci:%s/app-ocidir:app:2'),
                             ('base', 'docker-archive:%s/base.tar:base:1')):
            b('push', '-q', kind == 'base' and 'base:1' or 'app:2', target % top)
            out[kind] = (target % top).split(':')[1]
        out['top'] = top
        yield out
    finally:
        b.close()


@pytest.fixture
def image_names(cocker):
    new = unique_names('oci')
    yield new
    for name in new.made:
        for line in cocker('-s', 'images').out.splitlines()[2:]:
            if line.split()[0] == name:
                cocker('-a', 'del_image', '-m', '%s:%s' % (name, line.split()[1]), '-f')


def layers_of(home):
    path = os.path.join(home, 'layers')
    return set(e for e in os.listdir(path) if not e.startswith('.')) if os.path.isdir(path) \
        else set()


def store_is_clean(home):
    """Nothing hidden half-made in the stores."""
    for store in ('images', 'containers', 'layers'):
        assert not os.path.exists(os.path.join(home, store, '.staging')), store


APP_CHECK = 'ls /data; echo -; ls /opq; echo -; cat /etc/sym; stat -c "%h %a" /etc/hello /bin/su2'
APP_SEEN = 'keep\n-\nnew\n-\nhello\n2 644\n1 4755\n'


def check_app(cocker, names, ref):
    c = names()
    r = cocker('-a', 'create', '-m', ref, '-c', c, '-b')
    assert r.rc == 0, r
    r = cocker('-a', 'run', '-c', c, '--cmd', APP_CHECK)
    assert r.rc == 0, r
    assert r.out == APP_SEEN, \
        'the deleted file gone, the opaque directory emptied, links and setuid kept: %r' % r.out
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0


def test_each_archive_format_imports_and_boots_as_built(built, cocker, names, image_names,
                                                        home):
    before = layers_of(home)
    name = image_names()
    for kind in ('docker', 'oci', 'ocidir'):
        r = cocker('-a', 'import', '--image-file', built[kind], '-m', '%s:%s' % (name, kind))
        assert r.rc == 0 and r.out == 'OK\n', (kind, r)
        check_app(cocker, names, '%s:%s' % (name, kind))
    assert len(layers_of(home) - before) == 2, 'three imports of one image: its 2 layers once'
    for store in ('layers', 'l'):
        assert os.stat(os.path.join(home, store)).st_mode & 0o077 == 0, \
            '%s holds setuid files of images: root\'s alone' % store
    # a copy keeps the shared layers; the cockerimage format cannot hold them
    assert cocker('-a', 'copy_image', '--from-image', name + ':oci', '--to-image',
                  name + ':copy').rc == 0
    assert cocker('-a', 'del_image', '-m', name + ':oci').rc == 0
    check_app(cocker, names, '%s:copy' % name)
    r = cocker('-a', 'export', '-m', name + ':copy')
    assert r.rc == 255 and '--format docker or oci' in r.err, r
    store_is_clean(home)


def test_the_name_comes_from_the_archive_and_layers_are_shared(built, cocker, names, home):
    before = layers_of(home)
    r = cocker('-a', 'import', '--image-file', built['base'])
    assert r.rc == 0, r
    try:
        r = cocker('-a', 'import', '--image-file', built['docker'])
        assert r.rc == 0, r
        try:
            listed = [l.split()[:2] for l in cocker('-s', 'images').out.splitlines()[2:]]
            assert ['base', '1'] in listed and ['app', '2'] in listed, \
                'localhost/base:1 and localhost/app:2 become base:1 and app:2: %r' % listed
            assert len(layers_of(home) - before) == 2, 'app shares the base layer of base'
            info = cocker('-s', 'image_info', '-m', 'app:2')
            assert info.rc == 0, info
            lines = info.out.splitlines()
            assert lines[0] == 'image: app:2' and lines[1] == 'origin: %s (an archive)' % \
                built['docker'], lines
            layer_lines = [l for l in lines if l.startswith('layer: sha256:')]
            assert len(layer_lines) == 2 and layer_lines[0].endswith('in 2 image(s)') and \
                layer_lines[1].endswith('in 1 image(s)'), 'the base layer is shared: %r' % lines
            r = cocker('-a', 'to_container', '--from-image', 'app:2', '--to-container', 'x')
            assert r.rc == 255 and 'imported' in r.err and \
                'app' in cocker('-s', 'images').out, r
            du = subprocess.check_output(['du', '-sb', os.path.join(home, 'layers')])
            assert int(du.split()[0]) < 2 * os.path.getsize(BUSYBOX) + (1 << 20) + \
                os.path.getsize(BUSYBOX), 'busybox is stored twice at most (base, su2)'
        finally:
            assert cocker('-a', 'del_image', '-m', 'app:2').rc == 0
        assert len(layers_of(home) - before) == 1, 'the layer only app had is gone'
        c = names()
        r = cocker('-a', 'create', '-m', 'base:1', '-c', c, '-b')
        assert r.rc == 0, r
        assert cocker('-a', 'run', '-c', c, '--cmd', 'cat /data/gone').out == 'one\n'
        assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    finally:
        assert cocker('-a', 'del_image', '-m', 'base:1').rc == 0
    assert layers_of(home) == before, 'no image lists them: every layer gone'
    store_is_clean(home)


# ---- hostile archives --------------------------------------------------------------------

def unpacked(archive, into):
    os.makedirs(into)
    with tarfile.open(archive) as t:
        t.extractall(into)
    return into


def repacked(directory, archive):
    with tarfile.open(archive, 'w') as t:
        for entry in sorted(os.listdir(directory)):
            t.add(os.path.join(directory, entry), entry)
    return archive


def layer_tar(members):
    """A layer blob (plain tar) of (TarInfo, data) members."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def docker_archive(path, layers, diff_ids=None, config_name='cfg.json', layer_names=None,
                   links=()):
    """A docker save archive of plain layer blobs, as a hostile party would write it;
    links: (name, target) symlinks that stand for layers."""
    import hashlib
    layer_names = layer_names or ['l%d/layer.tar' % i for i in range(len(layers))]
    config = {'architecture': 'amd64', 'os': 'linux', 'rootfs': {'type': 'layers', 'diff_ids': (
        diff_ids or ['sha256:' + hashlib.sha256(l).hexdigest() for l in layers])}}
    files = {'manifest.json': json.dumps([{'Config': config_name, 'RepoTags': ['evil:1'],
                                            'Layers': layer_names}]).encode(),
             config_name: json.dumps(config).encode()}
    for name, data in zip(layer_names, layers):
        if '..' not in name and name not in dict(links):
            files[name] = data
    with tarfile.open(path, 'w') as t:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return path


def regular(name, data=b'x'):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_hostile_archives_are_refused_and_nothing_is_kept(built, cocker, image_names, home,
                                                          tmp_path):
    import hashlib
    good = layer_tar([regular('ok')])
    opaque = tarfile.TarInfo('d')
    opaque.type = tarfile.DIRTYPE
    opaque.pax_headers = {'SCHILY.xattr.trusted.overlay.opaque': 'y'}
    swapped = str(tmp_path / 'swapped')
    layout = unpacked(built['oci'], swapped)
    blobs = os.path.join(layout, 'blobs', 'sha256')
    layer_blobs = sorted((os.path.getsize(os.path.join(blobs, b)), b) for b in os.listdir(blobs))
    biggest = os.path.join(blobs, layer_blobs[-1][1])
    import gzip
    with open(biggest, 'rb') as f:                      # the same layer, other bytes
        layer = gzip.decompress(f.read())
    with open(biggest, 'wb') as f:
        f.write(gzip.compress(layer, compresslevel=1))
    zstd_blob = subprocess.check_output(['zstd', '-q', '-c'], input=good)
    cases = [
        ('a layer blob that does not match its digest', swapped, None,
         'does not match its digest'),
        ('a diff_id that is not the layer', docker_archive(
            str(tmp_path / 'diff.tar'), [good], ['sha256:' + hashlib.sha256(b'x').hexdigest()]),
         None, 'not its diff_id'),
        ('a manifest pointing outside the archive', docker_archive(
            str(tmp_path / 'out.tar'), [good], layer_names=['../../etc/passwd']), None,
         'outside itself'),
        ('a layer with ../ in a name', docker_archive(
            str(tmp_path / 'dots.tar'), [layer_tar([regular('a/../../x')])]), None, "'..'"),
        ('a layer planting trusted.overlay.opaque', docker_archive(
            str(tmp_path / 'xattr.tar'), [layer_tar([(opaque, None)])]), None, 'trusted'),
        ('a whiteout of ..', docker_archive(
            str(tmp_path / 'wh.tar'), [layer_tar([regular('a/.wh...', b'')])]), None,
         'whiteout'),
        ('a layer that is a loop of links', docker_archive(
            str(tmp_path / 'loop.tar'), [good, good], links=[
                ('l0/layer.tar', '../l1/layer.tar'), ('l1/layer.tar', '../l0/layer.tar')]),
         None, 'loop of links'),
        ('a layer linked to a host file', docker_archive(
            str(tmp_path / 'host.tar'), [good], links=[('l0/layer.tar', '/etc/passwd')]),
         None, 'outside itself'),
        ('a zstd layer on a host without zstd', docker_archive(
            str(tmp_path / 'zstd.tar'), [zstd_blob], ['sha256:' + hashlib.sha256(good).hexdigest()]),
         'nozstd', 'zstd'),
    ]
    nozstd = tmp_path / 'bin'
    nozstd.mkdir()
    os.symlink(shutil.which('tar'), str(nozstd / 'tar'))
    before = layers_of(home)
    for what, path, env, text in cases:
        name = image_names()
        extra = {'env': {'PATH': str(nozstd)}} if env else {}
        r = cocker('-a', 'import', '--image-file', path, '-m', name + ':1', **extra)
        assert r.rc == 255, (what, r)
        lines = r.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith('*** ERROR : ') and text in lines[0], \
            (what, r)
        assert not os.path.exists(os.path.join(home, 'images', name)), what
        assert layers_of(home) == before, '%s: no layer kept' % what
        store_is_clean(home)
    # a layout directory whose index is a link to a host file; an index of the wrong shape
    linked = str(tmp_path / 'linked')
    shutil.copytree(built['ocidir'], linked)
    os.unlink(os.path.join(linked, 'index.json'))
    os.symlink('/etc/passwd', os.path.join(linked, 'index.json'))
    shaped = str(tmp_path / 'shaped')
    shutil.copytree(built['ocidir'], shaped)
    with open(os.path.join(shaped, 'index.json'), 'w') as f:
        f.write('{"schemaVersion": 2, "manifests": [7]}')
    for what, path, text in (('a linked index', linked, 'index.json'),
                             ('an index of the wrong shape', shaped, 'malformed')):
        r = cocker('-a', 'import', '--image-file', path, '-m', image_names() + ':1')
        assert r.rc == 255 and len(r.err.splitlines()) == 1 and text in r.err, (what, r)
        assert layers_of(home) == before, what
    # a GNU long name (over 100 characters) is an ordinary member
    long_name = 'd/' + 'n' * 150
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode='w', format=tarfile.GNU_FORMAT) as t:
        t.addfile(*(lambda i, d: (i, io.BytesIO(d)))(*regular(long_name, b'long\n')))
    name = image_names()
    r = cocker('-a', 'import', '--image-file', docker_archive(str(tmp_path / 'gnu.tar'),
                                                             [gnu.getvalue()]), '-m', name + ':1')
    assert r.rc == 0, r
    stored = open(os.path.join(home, 'images', name, '1', 'layers')).read().split()[0]
    assert open(os.path.join(home, 'layers', stored.split(':')[1], 'rlayer', long_name)).read() \
        == 'long\n'
    assert cocker('-a', 'del_image', '-m', name + ':1').rc == 0
    # legacy docker save: a layer it has twice is a link to the first
    empty = layer_tar([])
    name = image_names()
    r = cocker('-a', 'import', '--image-file', docker_archive(
        str(tmp_path / 'twice.tar'), [good, empty, empty],
        links=[('l2/layer.tar', '../l1/layer.tar')]), '-m', name + ':1')
    assert r.rc == 0, r
    assert len(open(os.path.join(home, 'images', name, '1', 'layers')).read().split()) == 3
    assert cocker('-a', 'del_image', '-m', name + ':1').rc == 0
    # the same zstd layer where the host has zstd
    name = image_names()
    r = cocker('-a', 'import', '--image-file', str(tmp_path / 'zstd.tar'), '-m', name + ':1')
    assert r.rc == 0, r


def test_an_image_of_125_layers_boots(built, cocker, names, image_names, home):
    """overlayfs takes one page of mount options: the layers go by their short names."""
    b = Buildah(os.path.join(built['top'], 'deep'))
    try:
        b.layer('scratch', base_files, 'deep:1')

        def one_more(number):
            def change(root):
                os.makedirs(os.path.join(root, 'layers'), exist_ok=True)
                with open(os.path.join(root, 'layers', 'f%d' % number), 'w') as f:
                    f.write('%d\n' % number)
            return change
        for number in range(2, 126):
            b.layer('deep:%d' % (number - 1), one_more(number), 'deep:%d' % number)
        archive = os.path.join(built['top'], 'deep.tar')
        b('push', '-q', 'deep:125', 'oci-archive:%s:deep:125' % archive)
    finally:
        b.close()
    name = image_names()
    r = cocker('-a', 'import', '--image-file', archive, '-m', name + ':125')
    assert r.rc == 0, r
    assert len(open(os.path.join(home, 'images', name, '125', 'layers')).read().split()) == 125
    c = names()
    r = cocker('-a', 'create', '-m', name + ':125', '-c', c, '-b')
    assert r.rc == 0, r
    r = cocker('-a', 'run', '-c', c, '--cmd', 'cat /layers/f2 /layers/f125; ls /layers | wc -l')
    assert r.rc == 0 and r.out.split() == ['2', '125', '124'], r
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0


@pytest.fixture(scope='module')
def configured(built):
    """An oci-archive of an image with a command, Env, WorkingDir and User of its own."""
    b = Buildah(os.path.join(built['top'], 'cfg'))

    def accounts(root):
        base_files(root)
        with open(os.path.join(root, 'etc', 'passwd'), 'w') as f:
            f.write('root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/home/web:/bin/sh\n')
        with open(os.path.join(root, 'etc', 'group'), 'w') as f:
            f.write('root:x:0:\nweb:x:1000:\nextra:x:2000:web\n')
    try:
        b.layer('scratch', accounts, 'cfg:1')
        c = b('from', 'cfg:1')
        b('config', '--env', 'FOO=bar', '--env', 'PATH=/bin', '--workingdir', '/srv',
          '--user', 'web', '--entrypoint', '["/bin/sh", "-c"]',
          '--cmd', '["echo main $FOO $(id -u) $(id -G) $(pwd) $HOME; exec sleep 1000"]', c)
        b('commit', '-q', c, 'cfg:2')
        archive = os.path.join(built['top'], 'cfg.tar')
        b('push', '-q', 'cfg:2', 'oci-archive:%s:cfg:2' % archive)
        c = b('from', 'cfg:1')
        b('config', '--stop-signal', 'SIGUSR1', '--entrypoint', '["/bin/sh", "-c"]', '--cmd',
          '["trap \'echo stopped by USR1; exit 0\' USR1; echo up; while :; do sleep 0.1; done"]',
          c)
        b('commit', '-q', c, 'stop:1')
        b('push', '-q', 'stop:1', 'docker-archive:%s:stop:1' % archive.replace('cfg', 'stop'))
    finally:
        b.close()
    return archive


def main_output(home, name, cocker):
    """What the container's main process wrote to its log (lines not cockerinit's own)."""
    from conftest import wait_for, container_path

    def written():
        try:                            # (the monitor makes it at its first copy, which
            with open(container_path(home, name, 'cockerinit.log')) as f:  # may follow OK)
                log = f.read().splitlines()
        except FileNotFoundError:
            return []
        return [l for l in log if l and ' | ' not in l]
    wait_for(written, what='the main process to write')
    return written()


def test_an_image_runs_as_its_author_meant(configured, cocker, names, image_names, home):
    name = image_names()
    r = cocker('-a', 'import', '--image-file', configured, '-m', name + ':2')
    assert r.rc == 0, r
    c = names()
    r = cocker('-a', 'create', '-m', name + ':2', '-c', c, '-b')
    assert r.rc == 0, r
    assert main_output(home, c, cocker) == ['main bar 1000 1000 2000 /srv /home/web'], \
        'Entrypoint + Cmd as the user web, in /srv, with the image Env'
    r = cocker('-a', 'run', '-c', c, '--cmd', 'echo $FOO $(id -u) $(pwd) $HOME $PATH')
    assert r.rc == 0 and r.out == 'bar 1000 /srv /home/web /bin\n', r
    info = cocker('-s', 'image_info', '-m', name + ':2').out.splitlines()
    assert 'User: "web"' in info and 'WorkingDir: "/srv"' in info and \
        'Env: ["FOO=bar", "PATH=/bin"]' in info and 'Entrypoint: ["/bin/sh", "-c"]' in info, info
    r = cocker('-a', 'run', '-c', c, '--user', 'root', '--cmd', 'id -u; id -G')
    assert r.rc == 0 and r.out == '0\n0\n', r
    r = cocker('-a', 'run', '-c', c, '--user', 'nobody', '--cmd', 'true')
    assert r.rc == 255 and "user 'nobody' is not in the container's /etc/passwd" in r.err, r
    status = open('/proc/%s/status' % open(os.path.join(
        home, 'containers', c, 'init_pid')).read()).read()
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    assert 'Uid:\t0' in status, 'PID 1 itself stays root'
    # -e replaces Cmd (its words after the entrypoint), --env adds and overrides, --user wins
    c = names()
    r = cocker('-a', 'create', '-m', name + ':2', '-c', c, '--env', 'FOO=over', '--env',
               'NEW=1', '--user', '0:2000', '-b', '-e',
               "'echo e $FOO $NEW $(id -u) $(id -g); exec sleep 1000'")
    assert r.rc == 0, r
    assert main_output(home, c, cocker) == ['e over 1 0 2000']
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    # --entrypoint replaces the image's and drops its Cmd
    c = names()
    r = cocker('-a', 'create', '-m', name + ':2', '-c', c, '--entrypoint',
               "/bin/sh -c 'echo own; exec sleep 1000'", '-b')
    assert r.rc == 0, r
    assert main_output(home, c, cocker) == ['own']
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0


def test_the_image_stop_signal_stops_the_main_process(configured, cocker, names, image_names,
                                                      home):
    """StopSignal USR1, which the main process traps (SIGTERM would end it silently)."""
    name = image_names()
    r = cocker('-a', 'import', '--image-file', configured.replace('cfg', 'stop'), '-m', name)
    assert r.rc == 0, r
    c = names()
    assert cocker('-a', 'create', '-m', name, '-c', c, '-b').rc == 0
    assert main_output(home, c, cocker) == ['up']
    assert cocker('-s', 'image_info', '-m', name).out.count('StopSignal: "SIGUSR1"') == 1
    assert cocker('-a', 'shutdown', '-c', c).rc == 0
    assert main_output(home, c, cocker) == ['up', 'stopped by USR1']
    assert cocker('-a', 'destroy', '-c', c).rc == 0


class Podman(object):
    """podman with a storage of its own, run by runc (crun refuses this host's hybrid
    cgroups) with limits this host grants (its default RLIMIT_NOFILE is above them)."""

    def __init__(self, top):
        import tempfile
        self.runroot = tempfile.mkdtemp(prefix='cocker-podman.')   # at most 50 characters
        self.argv = ['podman', '--root', os.path.join(top, 'proot'), '--runroot', self.runroot,
                     '--storage-driver', 'vfs', '--runtime', 'runc']

    def __call__(self, *args):
        p = subprocess.Popen(self.argv + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (args, out, err)
        return out.decode()

    def run(self, image, *argv):
        return self('run', '--rm', '--net', 'none', '--ulimit', 'nofile=1024:1024',
                    '--ulimit', 'nproc=1024:1024', image, *argv)

    def close(self):
        subprocess.call(self.argv + ['rmi', '--all', '--force'], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture
def podman(tmp_path):
    if shutil.which('podman') is None or shutil.which('runc') is None:
        pytest.fail('podman or runc is missing: tests/run.sh installs them')
    p = Podman(str(tmp_path))
    yield p
    p.close()



def test_exports_load_in_podman_and_skopeo_and_come_back_whole(built, configured, cocker, names,
                                                               image_names, home, tmp_path,
                                                               podman):
    """export --format docker|oci: skopeo copies each to a directory (checking every digest),
    podman loads and runs it with its config, and cocker imports it back with the same
    files."""
    name = image_names()
    assert cocker('-a', 'import', '--image-file', built['docker'], '-m', name + ':1').rc == 0
    assert cocker('-a', 'import', '--image-file', configured, '-m', name + ':cfg').rc == 0
    for fmt, suffix, transport in (('docker', '.docker.tar', 'docker-archive'),
                                   ('oci', '.oci.tar', 'oci-archive')):
        r = cocker('-a', 'export', '-m', name + ':1', '--format', fmt, cwd=str(tmp_path))
        assert r.rc == 0 and r.out == 'OK\n', r
        archive = str(tmp_path / (name + '_1' + suffix))
        digest = open(archive + '.sha256').read().split()[0]
        assert subprocess.check_output(['sha256sum', archive]).split()[0].decode() == digest
        subprocess.check_call(['skopeo', 'copy', '-q', '%s:%s' % (transport, archive),
                               'dir:%s' % (tmp_path / ('dir-' + fmt))])
        assert 'localhost/%s:1' % name in podman('load', '-q', '-i', archive)
        assert podman.run('localhost/%s:1' % name, '/bin/sh', '-c', APP_CHECK) == APP_SEEN, \
            'what cocker -a run prints'
        podman('rmi', 'localhost/%s:1' % name)
        back = image_names()
        r = cocker('-a', 'import', '--image-file', archive, '-m', back + ':1')
        assert r.rc == 0, r
        check_app(cocker, names, back + ':1')
    r = cocker('-a', 'export', '-m', name + ':cfg', '--format', 'oci', cwd=str(tmp_path))
    assert r.rc == 0, r
    archive = str(tmp_path / (name + '_cfg.oci.tar'))
    inspected = json.loads(subprocess.check_output(
        ['skopeo', 'inspect', '--config', 'oci-archive:%s' % archive]))
    assert inspected['config']['User'] == 'web' and inspected['config']['WorkingDir'] == \
        '/srv' and inspected['config']['Entrypoint'] == ['/bin/sh', '-c'], inspected
    stored = open(os.path.join(home, 'images', name, 'cfg', 'layers')).read().split()
    assert len(inspected['rootfs']['diff_ids']) == len(stored), 'one layer each'
    podman('load', '-q', '-i', archive)
    # the image's Entrypoint, Env, User and WorkingDir; a Cmd that ends (the image's sleeps)
    out = podman.run('localhost/%s:cfg' % name, 'echo main $FOO $(id -u) $(id -G) $(pwd) $HOME')
    assert out == 'main bar 1000 1000 2000 /srv /home/web\n', 'podman runs it as cocker does'


CAP_NET_RAW = struct.pack('<IIIII', 0x02000000, 1 << 13, 0, 0, 0)  # vfs_cap_data, revision 2


def test_an_image_built_here_exports_as_its_stack(built, cocker, names, image_names, home,
                                                  tmp_path, podman):
    """The manual's way of building (a container over images, then to_image) exports as the
    stack's layers with the base's config: podman runs it, cocker imports it back as one
    image, file capabilities and user xattrs kept."""
    base = image_names()
    assert cocker('-a', 'import', '--image-file', built['base'], '-m', base + ':1').rc == 0
    c = names()
    assert cocker('-a', 'create', '-m', base + ':1', '-c', c, '-b').rc == 0
    r = cocker('-a', 'run', '-c', c, '--cmd', 'echo added > /etc/added; rm /data/keep/k')
    assert r.rc == 0, r
    assert cocker('-a', 'shutdown', '-c', c).rc == 0
    added = os.path.join(home, 'containers', c, 'rwlayer', 'etc', 'added')
    os.setxattr(added, 'security.capability', CAP_NET_RAW)
    os.setxattr(added, 'user.note', b'kept \xff')
    top = image_names()
    r = cocker('-a', 'to_image', '--from-container', c, '--to-image', top + ':1')
    assert r.rc == 0, r
    assert 'built on: %s:1' % base in cocker('-s', 'image_info', '-m', top + ':1').out
    r = cocker('-a', 'export', '-m', top + ':1', '--format', 'docker', cwd=str(tmp_path))
    assert r.rc == 0, r
    archive = str(tmp_path / (top + '_1.docker.tar'))
    inspected = json.loads(subprocess.check_output(
        ['skopeo', 'inspect', '--config', 'docker-archive:%s' % archive]))
    assert len(inspected['rootfs']['diff_ids']) == 2, 'the base layer, then the own one'
    podman('load', '-q', '-i', archive)
    assert podman.run('localhost/%s:1' % top, '/bin/sh', '-c',
                      'cat /etc/added; ls /data/keep; ls /data') == 'added\ngone\nkeep\n'
    back = image_names()
    assert cocker('-a', 'import', '--image-file', archive, '-m', back + ':1').rc == 0
    c = names()
    assert cocker('-a', 'create', '-m', back + ':1', '-c', c, '-b').rc == 0
    r = cocker('-a', 'run', '-c', c, '--cmd', 'cat /etc/added; ls /data/keep; ls /data')
    assert r.rc == 0 and r.out == 'added\ngone\nkeep\n', 'one image, the whole stack: %r' % r
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    own = open(os.path.join(home, 'images', back, '1', 'layers')).read().split()[-1]
    stored = os.path.join(home, 'layers', own.split(':')[1], 'rlayer', 'etc', 'added')
    assert os.getxattr(stored, 'security.capability') == CAP_NET_RAW
    assert os.getxattr(stored, 'user.note') == b'kept \xff'
    # a base that is gone: the stack cannot be written, and nothing is
    assert cocker('-a', 'del_image', '-m', base + ':1').rc == 0
    r = cocker('-a', 'export', '-m', top + ':1', '--format', 'oci', cwd=str(tmp_path))
    assert r.rc == 255 and "was built on '%s:1', which is gone" % base in r.err, r
    assert not os.path.exists(str(tmp_path / (top + '_1.oci.tar')))
