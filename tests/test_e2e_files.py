"""Files in containers: rplfile, putfile, getfile (the manual's examples 3.1.22-3.1.26
verbatim, then directories, modes, owners, stopped containers and symlink escapes)."""

import os
import subprocess

import pytest

from conftest import COCKER, PYTHON, REPO, container_path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_manual_examples(running, cocker, home, workdir):
    name = running()
    # 3.1.22
    assert cocker('-a', 'run', '-c', name, '--cmd', 'hostname').out == name + '\n'
    # 3.1.23: map.txt outside, template and instance inside
    (workdir / 'map.txt').write_text('${LEAF} 我的树叶\n', encoding='utf-8')
    r = cocker('-a', 'rplfile', '-c', name, '--template-file', '/root/tpl.txt',
               '--mapping-file', 'map.txt', '--instance-file', '/root/ins.txt')
    assert r.rc == 0 and r.out == 'OK\n', r
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /root/ins.txt; cat /root/tpl.txt')
    assert r.out == '{ "leaf":"我的树叶" }\n{ "leaf":"${LEAF}" }\n', r
    # 3.1.24 / 3.1.25
    r = cocker('-a', 'putfile', '-c', name, '--src-file', 'map.txt', '--dst-file', '/root/')
    assert r.out == 'OK\n', r
    os.unlink('map.txt')
    r = cocker('-a', 'getfile', '-c', name, '--src-file', '/root/map.txt', '--dst-file', './')
    assert r.out == 'OK\n', r
    assert (workdir / 'map.txt').read_text(encoding='utf-8') == '${LEAF} 我的树叶\n'
    # 3.1.26
    assert cocker('-s', 'container_root', '-c', name).out == \
        container_path(home, name, 'merged') + '\n'
    bindir = workdir / 'bin'                    # cocker installed as a command
    bindir.mkdir()
    os.symlink(COCKER, str(bindir / 'cocker'))
    out = subprocess.check_output(
        ['sh', '-c', '. "$0" "$1" && echo "$COCKER_CONTAINER_ROOT"',
         os.path.join(REPO, 'shbin', 'cocker_container_root.sh'), name],
        env=dict(os.environ, COCKER_HOME=home, COCKER_PYTHON=PYTHON,
                 PATH='%s:%s' % (bindir, os.environ['PATH'])))
    assert out.decode() == container_path(home, name, 'merged') + '\n'


def test_rplfile_in_place_with_spaces_and_a_shorter_result(running, cocker, workdir):
    name = running()
    (workdir / 'map.txt').write_text('${LEAF}   a value with  spaces\n\n  ${X} \t\nK2 v2\n',
                                     encoding='utf-8')
    r = cocker('-a', 'run', '-c', name, '--cmd',
               "printf '%s\\n' 'leaf=${LEAF} x=[${X}] k=K2 and a long tail to be cut off' "
               '> /root/t.conf; chmod 640 /root/t.conf; chown 7:8 /root/t.conf')
    assert r.rc == 0, r
    assert cocker('-a', 'rplfile', '-c', name, '--template-file', '/root/t.conf',
                  '--mapping-file', 'map.txt').rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /root/t.conf; stat -c "%a %u:%g" '
               '/root/t.conf')
    assert r.out == ('leaf=a value with  spaces x=[] k=v2 and a long tail to be cut off\n'
                     '640 7:8\n'), r
    (workdir / 'bad.txt').write_text('lonelykey\n')
    r = cocker('-a', 'rplfile', '-c', name, '--template-file', '/root/t.conf',
               '--mapping-file', 'bad.txt')
    assert r.rc == 255 and 'a key without a value' in r.err
    r = cocker('-a', 'rplfile', '-c', name, '--template-file', 'relative',
               '--mapping-file', 'map.txt')
    assert r.rc == 7


def test_directories_modes_and_owners_both_ways(running, cocker, workdir):
    name = running()
    tree = workdir / 'tree'
    (tree / 'sub').mkdir(parents=True)
    (tree / 'sub' / 'file').write_text('content\n')
    os.chmod(str(tree / 'sub'), 0o751)
    os.chmod(str(tree / 'sub' / 'file'), 0o604)
    os.chown(str(tree / 'sub' / 'file'), 1234, 5678)
    os.symlink('sub/file', str(tree / 'link'))
    assert cocker('-a', 'putfile', '-c', name, '--src-file', 'tree', '--dst-file', '/srv2').rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'stat -c "%n %a %u:%g" /srv2/sub /srv2/sub/file; readlink /srv2/link')
    assert r.out == '/srv2/sub 751 0:0\n/srv2/sub/file 604 1234:5678\nsub/file\n', r
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/srv2', '--dst-file', 'back').rc == 0
    st = os.stat(str(workdir / 'back' / 'sub' / 'file'))
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (oct(0o604), 1234, 5678)
    assert os.readlink(str(workdir / 'back' / 'link')) == 'sub/file'
    r = cocker('-a', 'getfile', '-c', name, '--src-file', '/nonexistent', '--dst-file', './')
    assert r.rc == 255 and 'not found' in r.err
    r = cocker('-a', 'putfile', '-c', name, '--src-file', 'nonexistent', '--dst-file', '/root/')
    assert r.rc == 255 and "src file 'nonexistent' not found" in r.err


def test_stopped_containers_too(cocker, test_image, names, home, workdir):
    name = names('stopped')
    assert cocker('-a', 'create', '-m', test_image, '-c', name).rc == 0
    (workdir / 'in.txt').write_text('put while stopped\n')
    assert cocker('-a', 'putfile', '-c', name, '--src-file', 'in.txt',
                  '--dst-file', '/root/in.txt').rc == 0
    assert not [l for l in open('/proc/mounts') if container_path(home, name) in l]
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/root/tpl.txt',
                  '--dst-file', 'tpl.txt').rc == 0
    assert (workdir / 'tpl.txt').read_text() == '{ "leaf":"${LEAF}" }\n'
    assert cocker('-a', 'boot', '-c', name).rc == 0
    assert cocker('-a', 'run', '-c', name, '--cmd', 'cat /root/in.txt').out == \
        'put while stopped\n'


def test_symlinks_never_lead_to_the_host(running, cocker, workdir, tmp_path):
    name = running()
    r = cocker('-a', 'run', '-c', name, '--cmd',
               'ln -s /etc/passwd /root/pw; ln -s / /root/top; ln -s /etc /root/etcdir; '
               'echo container-shadow > /etc/shadow')
    assert r.rc == 0, r
    host_passwd = open('/etc/passwd').read()
    # reading through links gets the container's files
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/root/pw',
                  '--dst-file', 'pw').rc == 0
    assert os.path.islink(str(workdir / 'pw')), 'the link itself, not the host file'
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/root/top/etc/shadow',
                  '--dst-file', 'shadow').rc == 0
    assert (workdir / 'shadow').read_text() == 'container-shadow\n'
    # writing through links lands in the container
    (workdir / 'passwd').write_text('owned\n')
    assert cocker('-a', 'putfile', '-c', name, '--src-file', 'passwd',
                  '--dst-file', '/root/etcdir/').rc == 0
    assert open('/etc/passwd').read() == host_passwd
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /etc/passwd')
    assert r.out == 'owned\n', r
    # a container destination that is a link to a directory of the host's name
    marker = str(tmp_path / 'hostdir')
    os.mkdir(marker)
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ln -s %s /root/out' % marker)
    r = cocker('-a', 'putfile', '-c', name, '--src-file', 'passwd', '--dst-file', '/root/out/')
    assert r.rc == 255 and 'is not a directory in the container' in r.err, r
    assert os.listdir(marker) == [], 'nothing reached the host directory'
    # an archive from the container cannot plant a link and write through it on the host
    r = cocker('-a', 'run', '-c', name, '--cmd', 'mkdir -p /x && ln -s %s /x/l' % marker)
    assert cocker('-a', 'getfile', '-c', name, '--src-file', '/x', '--dst-file', 'x').rc == 0
    assert os.path.islink(str(workdir / 'x' / 'l')) and os.listdir(marker) == []


def test_a_link_swapped_during_copies_never_reaches_the_host(cocker, test_image, names,
                                                            workdir, tmp_path):
    """Docker CVE-2018-15664: a container process swaps a directory for a symlink to a
    host-looking path while putfile and getfile run through it."""
    secret_dir = tmp_path / 'secret'
    secret_dir.mkdir()
    (secret_dir / 'key').write_text('host secret\n')
    name = names('race')
    loop = ('sh -c "while :; do rm -rf /root/d; mkdir -p /root/d; echo container > /root/d/key; '
            'rm -rf /root/d; ln -s %s /root/d; done"' % secret_dir)
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '-b', '-e', loop)
    assert r.rc == 0, r
    (workdir / 'payload').write_text('payload\n')
    for i in range(30):
        r = cocker('-a', 'getfile', '-c', name, '--src-file', '/root/d/key',
                   '--dst-file', 'got%d' % i)
        if r.rc == 0:                   # (caught between the loop's > and its echo: empty)
            assert (workdir / ('got%d' % i)).read_text() in ('container\n', '')
        cocker('-a', 'putfile', '-c', name, '--src-file', 'payload', '--dst-file', '/root/d/')
    assert os.listdir(str(secret_dir)) == ['key']
    assert (secret_dir / 'key').read_text() == 'host secret\n'
