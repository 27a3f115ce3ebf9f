"""Images end to end: versions, copy, delete, to_image / to_container, export / import.

Round trips check what an image must keep: content, mode, owner, a symlink, a hard link,
a deleted file (overlay whiteout), an opaque directory (xattr) and a top-level dot-file.
Hostile archives are made with tarfile and must change nothing, in the store or outside.
"""

import io
import os
import stat
import subprocess
import tarfile
import uuid

import pytest

from conftest import container_path, unique_names

EDIT = ('echo data > /root/f; chown 12:34 /root/f; chmod 750 /root/f; ln /root/f /root/hl; '
        'ln -s /etc/passwd /root/sl; rm /bin/true; touch /mnt/old; rm -rf /mnt; mkdir /mnt; echo new > /mnt/only; '
        'echo dot > /.dot')
CHECK = ('stat -c "%n %a %u:%g %h" /root/f /root/hl; readlink /root/sl; ls /mnt; cat /.dot; '
         'test -e /bin/true && echo true-is-back || echo true-is-gone; '
         'test $(stat -c %i /root/f) = $(stat -c %i /root/hl) && echo same-inode')
EXPECTED = ('/root/f 750 12:34 2\n/root/hl 750 12:34 2\n/etc/passwd\nonly\ndot\n'
            'true-is-gone\nsame-inode\n')


def images_listing(cocker):
    return cocker('-s', 'images').out


def store_entries(home):
    """Every name under images/ (hidden ones too): a refused import must add none."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(home, 'images')):
        rel = os.path.relpath(dirpath, os.path.join(home, 'images'))
        found += [os.path.join(rel, n) for n in dirnames + filenames if rel.count('/') < 2]
    return sorted(found)


@pytest.fixture
def image_names(cocker):
    """Unique image names for one test; every version of each is deleted afterwards."""
    new = unique_names('img')
    yield new
    for name in new.made:
        for line in images_listing(cocker).splitlines():
            if line.startswith(name + ' '):
                version = line.split()[1]
                ref = name if version == '_' else '%s:%s' % (name, version)
                cocker('-a', 'del_image', '-m', ref, '-f')


@pytest.fixture
def edited_image(cocker, test_image, names, image_names, home):
    """An image made by to_image from a container with EDIT applied: returns its name."""
    def make(version='1.0'):
        c = names('ed')
        assert cocker('-a', 'create', '-m', test_image, '-c', c, '-b').rc == 0
        r = cocker('-a', 'run', '-c', c, '--cmd', EDIT)
        assert r.rc == 0, r
        assert cocker('-a', 'shutdown', '-c', c).rc == 0
        # a device node in the container's layer (the test image has no mknod)
        os.mknod(container_path(home, c, 'rwlayer', 'root', 'null'), stat.S_IFCHR | 0o666,
                 os.makedev(1, 3))
        image = image_names('app')
        r = cocker('-a', 'to_image', '-m', 'x', '--from-container', c, '--version', version,
                   '--to-image', image)
        assert r.rc == 0 and r.out == 'OK\n', r
        assert not os.path.exists(container_path(home, c)), 'to_image uses the container up'
        return image
    return make


def boot_and_check(cocker, names, layers):
    c = names('chk')
    r = cocker('-a', 'create', '-m', layers, '-c', c, '-b')
    assert r.rc == 0, r
    r = cocker('-a', 'run', '-c', c, '--cmd', CHECK)
    assert r.out == EXPECTED, r
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0


def test_to_image_keeps_every_kind_of_change(edited_image, cocker, names, home):
    image = edited_image()
    rlayer = os.path.join(home, 'images', image, '1.0', 'rlayer')
    assert os.getxattr(os.path.join(rlayer, 'mnt'), 'trusted.overlay.opaque') == b'y'
    st = os.lstat(os.path.join(rlayer, 'bin', 'true'))
    assert (st.st_mode & 0o170000, st.st_rdev) == (0o020000, 0), 'a whiteout'
    st = os.lstat(os.path.join(rlayer, 'root', 'null'))
    assert (st.st_mode & 0o170000, os.major(st.st_rdev), os.minor(st.st_rdev)) == \
        (0o020000, 1, 3), 'a device node made in the container'
    boot_and_check(cocker, names, 'test,%s:1.0' % image)


def test_export_delete_import_boot(edited_image, cocker, names, home, tmp_path, monkeypatch):
    image = edited_image('2.1')
    monkeypatch.chdir(tmp_path)
    r = cocker('-a', 'export', '-m', '%s:2.1' % image)
    assert r.rc == 0 and r.out == 'OK\n' and r.err == '', 'quiet when stderr is no terminal'
    archive = '%s:2.1.cockerimage' % image
    assert sorted(os.listdir(str(tmp_path))) == [archive, archive + '.sha256']
    assert subprocess.call(['sha256sum', '--quiet', '-c', archive + '.sha256']) == 0
    names_in = subprocess.check_output(['tar', '--force-local', '-tzf', archive]).decode()
    assert 'root/f' in names_in.split() and not any(n.startswith(('/', './')) for n in
                                                    names_in.split()), 'C cocker member names'
    assert cocker('-a', 'del_image', '-m', '%s:2.1' % image).rc == 0
    r = cocker('-a', 'import', '--image-file', archive)
    assert r.rc == 0 and r.out == 'OK\n', r
    assert 'device node root/null skipped' in r.err, 'archives never bring device nodes in'
    boot_and_check(cocker, names, 'test,%s:2.1' % image)
    r = cocker('-a', 'import', '--image-file', archive)
    assert r.rc == 255 and "image '%s:2.1' exist" % image in r.err
    assert cocker('-a', 'import', '--image-file', archive, '-f').rc == 0
    # -m names the image whatever the file is called
    other = 'copy' + uuid.uuid4().hex[:6]
    os.rename(archive, 'anything.tgz')
    assert cocker('-a', 'import', '--image-file', 'anything.tgz', '-m', other + ':7').rc == 0
    boot_and_check(cocker, names, 'test,%s:7' % other)
    assert cocker('-a', 'del_image', '-m', other + ':7').rc == 0


def archive_members(path):
    """{name: (type, mode, owner, mtime, link, xattrs, data)} of a cockerimage."""
    members = {}
    with tarfile.open(path) as t:
        for m in t:
            data = t.extractfile(m).read() if m.isfile() else None
            xattrs = sorted((k, v) for k, v in m.pax_headers.items() if 'xattr' in k)
            members[m.name.rstrip('/')] = (m.type, m.mode, (m.uid, m.gid), m.mtime,
                                           m.linkname, xattrs, data)
    return members


def test_a_cockerimage_exported_imported_and_exported_again_is_the_same(
        edited_image, cocker, image_names, tmp_path, monkeypatch):
    image = edited_image('3')
    monkeypatch.chdir(tmp_path)
    assert cocker('-a', 'export', '-m', image + ':3').rc == 0
    again = image_names('again')
    assert cocker('-a', 'import', '--image-file', image + ':3.cockerimage', '-m',
                  again + ':3').rc == 0
    assert cocker('-a', 'export', '-m', again + ':3').rc == 0
    first = archive_members(image + ':3.cockerimage')
    second = archive_members(again + ':3.cockerimage')
    assert first.pop('root/null')[0] == tarfile.CHRTYPE, 'the one device node, not imported'
    assert len(first) > 5 and first == second, 'every name, owner, mode, time, link, xattr ' \
        'and byte the same'
    assert any(xattrs for _, _, _, _, _, xattrs, _ in first.values()), 'the opaque directory'


def test_an_archive_made_the_c_cocker_way_imports(cocker, test_image, names, tmp_path, monkeypatch,
                                                 home):
    src = tmp_path / 'rlayer'
    (src / 'root').mkdir(parents=True)
    (src / 'root' / 'hello').write_text('from tar czf\n')
    os.chmod(str(src / 'root' / 'hello'), 0o640)
    name = 'ctar' + uuid.uuid4().hex[:6]
    archive = str(tmp_path / ('%s:1.0.cockerimage' % name))
    subprocess.check_call('cd %s && tar --force-local -czf %s *' % (src, archive), shell=True)
    monkeypatch.chdir(tmp_path)
    r = cocker('-a', 'import', '--image-file', os.path.basename(archive))
    assert r.rc == 0, r
    c = names('ct')
    assert cocker('-a', 'create', '-m', '%s,%s:1.0' % (test_image, name), '-c', c, '-b').rc == 0
    r = cocker('-a', 'run', '-c', c, '--cmd', 'cat /root/hello; stat -c %a /root/hello')
    assert r.out == 'from tar czf\n640\n', r
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    assert cocker('-a', 'del_image', '-m', name + ':1.0').rc == 0
    assert not os.path.exists(os.path.join(home, 'images', name))


def tar_bytes(members, fmt=tarfile.PAX_FORMAT):
    """A gzip tar of (TarInfo, data or None) pairs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w:gz', format=fmt) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return raw.getvalue()


def member(name, kind=tarfile.REGTYPE, link='', **kw):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_hostile_and_broken_archives_change_nothing(cocker, tmp_path, monkeypatch, home):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / 'outside'
    outside.mkdir()
    ok = (member('etc/ok'), b'fine\n')
    good = tar_bytes([ok])
    cases = {
        'absolute': tar_bytes([ok, (member(str(outside / 'abs')), b'x')]),
        'dotdot': tar_bytes([ok, (member('../../outside/up'), b'x')]),
        'symlink-then-write': tar_bytes([(member('lnk', tarfile.SYMTYPE, str(outside)), None),
                                         (member('lnk/through'), b'x')]),
        'symlink-dir-then-write': tar_bytes([(member('a', tarfile.DIRTYPE), None),
                                             (member('a/b', tarfile.SYMTYPE, '/'), None),
                                             (member('a/b/tmp/evil'), b'x')]),
        'hardlink-out': tar_bytes([ok, (member('hl', tarfile.LNKTYPE, '../../etc/passwd'),
                                        None)]),
        'hardlink-absolute': tar_bytes([ok, (member('hl', tarfile.LNKTYPE, '/etc/passwd'),
                                             None)]),
        'pax-path': tar_bytes([ok, (member('harmless', pax_headers={'path': '/tmp/x'}), b'x')]),
        'gnu-longname': tar_bytes([ok, (member('../' * 40 + 'long'), b'x')],
                                  fmt=tarfile.GNU_FORMAT),
        'truncated': good[:len(good) // 2],
        'not-gzip': b'this is not an image\n' * 100,
        'plain-tar': tar_bytes([ok])[:0] + b'\0' * 10240,
        'empty': b'',
    }
    before = store_entries(home)
    listing = images_listing(cocker)
    for case, data in sorted(cases.items()):
        name = 'hostile-' + case
        with open(name + '.cockerimage', 'wb') as f:
            f.write(data)
        r = cocker('-a', 'import', '--image-file', name + '.cockerimage')
        assert r.rc == 255 and r.err.startswith('*** ERROR : ') and r.err.count('\n') == 1, \
            (case, r)
        assert 'Traceback' not in r.err
        assert store_entries(home) == before, case
        assert os.listdir(str(outside)) == [], case
    assert images_listing(cocker) == listing
    # a good archive with a wrong .sha256 beside it
    with open('sha.cockerimage', 'wb') as f:
        f.write(good)
    with open('sha.cockerimage.sha256', 'w') as f:
        f.write('%s  sha.cockerimage\n' % ('0' * 64))
    r = cocker('-a', 'import', '--image-file', 'sha.cockerimage')
    assert r.rc == 255 and 'sha256' in r.err and store_entries(home) == before, r
    r = cocker('-a', 'import', '--image-file', 'missing.cockerimage')
    assert r.rc == 255 and 'No such file' in r.err
    r = cocker('-a', 'import', '--image-file', 'noname.tgz')
    assert r.rc == 255 and 'invalid' in r.err


def test_a_damaged_member_is_caught_by_its_crc_whatever_the_sha256(
        cocker, test_image, image_names, tmp_path, monkeypatch, home):
    """A cockerimage's gzip members give their length in their head (bytes 16-19 after the
    'Ck' subfield); each ends with the CRC of the data that was compressed.  A .sha256 is
    of the compressed stream only (made again after damage, or hashing bytes that changed
    after compression, it would vouch for them): the CRCs are checked whatever it says."""
    import hashlib
    monkeypatch.chdir(tmp_path)
    assert cocker('-a', 'export', '-m', test_image).rc == 0
    with open(test_image + '.cockerimage', 'rb') as f:
        good = f.read()
    assert good[12:14] == b'Ck', 'a member that says how long it is'
    length = int.from_bytes(good[16:20], 'little')
    bad = good[:length - 8] + bytes([good[length - 8] ^ 1]) + good[length - 7:]
    before, listing = store_entries(home), images_listing(cocker)
    copy = image_names('crc')
    archive = copy + '.cockerimage'
    with open(archive, 'wb') as f:
        f.write(bad)
    for case, digest in (('the original digest', hashlib.sha256(good).hexdigest()),
                         ('a digest of the damaged file', hashlib.sha256(bad).hexdigest()),
                         ('no .sha256', None)):
        if digest:
            with open(archive + '.sha256', 'w') as f:
                f.write('%s  %s\n' % (digest, archive))
        elif os.path.exists(archive + '.sha256'):
            os.unlink(archive + '.sha256')
        r = cocker('-a', 'import', '--image-file', archive)
        assert r.rc == 255 and r.err.count('\n') == 1 and 'CRC' in r.err, (case, r)
        assert store_entries(home) == before and images_listing(cocker) == listing, case


def test_device_nodes_are_skipped_whiteouts_kept(cocker, tmp_path, monkeypatch, home):
    monkeypatch.chdir(tmp_path)
    name = 'dev' + uuid.uuid4().hex[:6]
    data = tar_bytes([(member('etc/ok'), b'fine\n'),
                      (member('dev/sda', tarfile.BLKTYPE, devmajor=8, devminor=0), None),
                      (member('dev/mem', tarfile.CHRTYPE, devmajor=1, devminor=1), None),
                      (member('bin/gone', tarfile.CHRTYPE, devmajor=0, devminor=0), None)])
    with open(name + '.cockerimage', 'wb') as f:
        f.write(data)
    r = cocker('-a', 'import', '--image-file', name + '.cockerimage')
    assert r.rc == 0, r
    assert 'dev/sda skipped' in r.err and 'dev/mem skipped' in r.err
    rlayer = os.path.join(home, 'images', name, '_', 'rlayer')
    assert not os.path.lexists(os.path.join(rlayer, 'dev', 'sda'))
    assert not os.path.lexists(os.path.join(rlayer, 'dev', 'mem'))
    assert os.lstat(os.path.join(rlayer, 'bin', 'gone')).st_rdev == 0
    assert cocker('-a', 'del_image', '-m', name).rc == 0


def test_version_copy_and_delete(edited_image, cocker, names, home):
    image = edited_image('1.0')
    r = cocker('-a', 'version', '-m', image + ':1.0', '--version', '1.0')
    assert r.rc == 255 and 'version equal' in r.err
    assert cocker('-a', 'version', '-m', image + ':1.0', '--version', '2.0').out == 'OK\n'
    assert cocker('-a', 'version', '-m', image + ':2.0').out == 'OK\n', 'back to _'
    assert os.listdir(os.path.join(home, 'images', image)) == ['_']
    copy = image + 'c'
    assert cocker('-a', 'copy_image', '--from-image', image, '--to-image', copy + ':3').rc == 0
    r = cocker('-a', 'copy_image', '--from-image', image, '--to-image', copy + ':3')
    assert r.rc == 255 and 'exist' in r.err
    boot_and_check(cocker, names, 'test,%s:3' % copy)
    # in use: refused; -f for stopped users only
    c = names('user')
    assert cocker('-a', 'create', '-m', 'test,%s:3' % copy, '-c', c).rc == 0
    r = cocker('-a', 'del_image', '-m', copy + ':3')
    assert r.rc == 255 and "used by container(s) %s" % c in r.err, r
    r = cocker('-a', 'version', '-m', copy + ':3', '--version', '4')
    assert r.rc == 255 and 'used by' in r.err
    assert cocker('-a', 'version', '-m', copy + ':3', '--version', '4', '-f').rc == 0
    assert open(container_path(home, c, 'layers')).read() == 'test:_,%s:4' % copy, \
        'a forced rename takes its stopped users along'
    assert cocker('-a', 'boot', '-c', c).rc == 0
    r = cocker('-a', 'del_image', '-m', copy + ':4', '-f')
    assert r.rc == 255 and 'running' in r.err
    assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    assert cocker('-a', 'del_image', '-m', copy + ':4').out == 'OK\n'
    assert not os.path.exists(os.path.join(home, 'images', copy))
    r = cocker('-a', 'del_image', '-m', 'nosuch')
    assert r.rc == 255 and "image 'nosuch' not found" in r.err


def test_to_container_edits_an_image_in_place(edited_image, cocker, names, home):
    image = edited_image('5.0')
    c = names('tc')
    r = cocker('-a', 'to_container', '--from-image', image + ':5.0', '-m', 'test',
               '--to-container', c)
    assert r.rc == 0, r
    assert not os.path.exists(os.path.join(home, 'images', image)), 'the image is used up'
    assert open(container_path(home, c, 'version')).read() == '5.0'
    assert cocker('-a', 'boot', '-c', c).rc == 0
    r = cocker('-a', 'run', '-c', c, '--cmd', CHECK + '; echo more > /root/g')
    assert r.out == EXPECTED, r
    assert cocker('-a', 'shutdown', '-c', c).rc == 0
    # back to an image: the version recorded by to_container is kept
    assert cocker('-a', 'to_image', '--from-container', c, '--to-image', image).rc == 0
    assert os.listdir(os.path.join(home, 'images', image)) == ['5.0']
    c2 = names('tc')
    assert cocker('-a', 'create', '-m', 'test,%s' % image, '-c', c2, '-b').rc == 0
    r = cocker('-a', 'run', '-c', c2, '--cmd', 'cat /root/g; ' + CHECK)
    assert r.out == 'more\n' + EXPECTED, r


def test_export_shows_progress_on_a_terminal(cocker, test_image, terminal, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = terminal('-a', 'export', '-m', 'test')
    assert t.wait(timeout=60) == 0
    text = t.output.decode()
    assert 'export test.cockerimage: ' in text and '/s' in text and 'left' in text, text
    assert os.path.exists(str(tmp_path / 'test.cockerimage'))
