"""The ssh image repository against a real OpenSSH server started on 127.0.0.1 for these
tests (conftest.Repository): its own port, host key and a dedicated user with an authorized
key, all removed at the end.  cocker reaches it through COCKER_HOME/ssh_config (known host,
identity)."""

import os
import subprocess
import uuid

from conftest import free_loopback_port


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
    closed = '%s@127.0.0.1:%d' % (repo.user, free_loopback_port())
    r = cocker('-a', 'spush', '-m', 'test', '--srepo', closed, timeout=60)
    assert r.rc == 255 and 'Connection refused' in r.err and r.err.count('\n') == 1, r
    r = cocker('-s', 'ssearch', '--srepo', 'no-user-part')
    assert r.rc == 7 and 'USER@HOST[:PORT]' in r.err
    r = cocker('-s', 'ssearch', '--srepo', 'a@b;reboot')
    assert r.rc == 7
