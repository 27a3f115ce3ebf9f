"""The shbin scripts, the bash completion and the man pages."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import COCKER, PYTHON, REPO

SHBIN = os.path.join(REPO, 'shbin')
CACHE = os.environ.get('COCKER_TEST_DEBOOTSTRAP_CACHE', '/var/cache/cocker-test')


@pytest.mark.parametrize('script, args', [
    ('cocker_install_test.sh', ['-x']),
    ('cocker_ldd_and_cp_lib64.sh', []),
    ('cocker_ldd_and_cp_lib64.sh', ['/tmp']),
    ('cocker_create_image_debian.sh', []),
    ('cocker_create_image_debian.sh', ['-q', 'x']),
    ('cocker_create_image_debian.sh', ['../escape']),
    ('cocker_create_image_rhel-7.4-x86_64.sh', ['only-author']),
    ('cocker_create_image_rhel-7.4-sshd-x86_64.sh', ['a', 'b', 'c']),
    ('cocker_create_image_rhel-7.4-gcc-x86_64.sh', ['--bad']),
    ('cocker_container_root.sh', []),
])
def test_scripts_refuse_bad_arguments_with_a_usage_line(script, args):
    p = subprocess.Popen(['sh', os.path.join(SHBIN, script)] + args, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, (script, args, out, err)
    assert err.decode().startswith(('USAGE : ', 'cocker_create_image_debian.sh: image name')), err


def test_rhel_scripts_fail_loudly_without_supermin(tmp_path):
    if shutil.which('supermin5'):
        pytest.skip('this host has supermin5: the script would really build an image')
    p = subprocess.Popen(['sh', os.path.join(SHBIN, 'cocker_create_image_rhel-7.4-x86_64.sh'),
                          'calvin', '1.0.0'], cwd=str(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and b'supermin5 is not installed' in err
    assert os.listdir(str(tmp_path)) == []


def test_ldd_and_cp_copies_a_program_that_then_runs_alone(tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    subprocess.check_call(['sh', os.path.join(SHBIN, 'cocker_ldd_and_cp_lib64.sh'), str(root),
                           'ls'])
    ls = shutil.which('ls')
    out = subprocess.check_output(['chroot', str(root), ls, '/'])
    assert sorted(out.decode().split()) == sorted(os.listdir(str(root)))


def test_debian_image_script_builds_an_image_that_boots(cocker, names, tmp_path):
    if not os.path.isfile(os.path.join(CACHE, 'bookworm', 'etc', 'debian_version')):
        pytest.fail('no debootstrap tree in %s: tests/run.sh downloads it before the tests '
                    '(the tests send nothing beyond loopback)' % CACHE)
    image = 'debian' + uuid.uuid4().hex[:6]
    subprocess.check_call(['sh', os.path.join(SHBIN, 'cocker_create_image_debian.sh'), '-c',
                           CACHE, image + ':12'], cwd=str(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    archive = '%s:12.cockerimage' % image
    assert sorted(os.listdir(str(tmp_path))) == [archive, archive + '.sha256']
    r = cocker('-a', 'import', '--image-file', str(tmp_path / archive))
    assert r.rc == 0 and r.err == '', r
    try:
        c = names('deb')
        assert cocker('-a', 'create', '-m', image + ':12', '-c', c, '-b').rc == 0
        r = cocker('-a', 'run', '-c', c, '--cmd', 'cat /etc/debian_version')
        assert r.rc == 0 and r.out.strip() == open(os.path.join(
            CACHE, 'bookworm', 'etc', 'debian_version')).read().strip(), r
        assert cocker('-a', 'destroy', '-c', c, '-h').rc == 0
    finally:
        assert cocker('-a', 'del_image', '-m', image + ':12', '-f').rc == 0


def complete(home, words):
    """What bash completion offers for the last of `words` (a `cocker ...` line)."""
    script = ('source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _cocker; printf "%%s\\n" '
              '"${COMPREPLY[@]}"' % (os.path.join(SHBIN, 'cocker.bash-completion'),
                                     ' '.join("'%s'" % w for w in words), len(words) - 1))
    out = subprocess.check_output(['bash', '-c', script], env=dict(os.environ,
                                                                    COCKER_HOME=home))
    return out.decode().split()


def test_completion_offers_actions_options_images_and_containers(cocker, test_image, names,
                                                                home):
    c = names('cmp')
    assert cocker('-a', 'create', '-m', test_image, '-c', c).rc == 0
    assert c in complete(home, ['cocker', '-a', 'boot', '-c', ''])
    # a prefix offers the containers it begins, and no other: here c alone, unless a container
    # of another test shares its first four letters
    sharing = sorted(n for n in os.listdir(os.path.join(home, 'containers'))
                     if n.startswith(c[:4]) and not n.startswith('.'))
    assert c in sharing
    assert sorted(complete(home, ['cocker', '-a', 'boot', '-c', c[:4]])) == sharing
    assert 'test' in complete(home, ['cocker', '-a', 'create', '-m', ''])
    assert sorted(complete(home, ['cocker', '-a', 'del'])) == ['del_bridge', 'del_image']
    assert complete(home, ['cocker', '-s', 'container_l']) == ['container_limits']
    assert '--port-mapping' in complete(home, ['cocker', '-a', 'create', '--p'])
    assert complete(home, ['cocker', '--net', 'BR']) == ['BRIDGE']


@pytest.mark.parametrize('page', ['cocker.1', 'cockerinit.8'])
def test_man_pages_render_without_warnings(page):
    p = subprocess.Popen(['groff', '-man', '-ww', '-z', os.path.join(REPO, 'man', page)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out == b'' and err == b'', err


def test_every_action_and_option_is_in_the_man_page_and_the_usage():
    cocker = __import__('conftest').load_script('cocker_doc', COCKER)
    page = open(os.path.join(REPO, 'man', 'cocker.1')).read().replace('\\-', '-').replace(
        '\\%', '').replace('\\:', '')
    for action in cocker.ACTIONS:
        assert '-a %s' % action in cocker.USAGE, action
        assert action in page, action
    for show in cocker.SHOWS:
        assert '-s %s' % show in cocker.USAGE and show in page, show
    for option in cocker.OPTIONS:
        assert option in page, option
    out = subprocess.check_output([PYTHON, COCKER, '--help']).decode()
    assert out == cocker.USAGE + '\n'


def test_pip_install_puts_the_scripts_beside_cocker(tmp_path):
    """pip install . (from a copy of the project: the build must not write into the tree)."""
    src = tmp_path / 'src'
    src.mkdir()
    for part in ('setup.cfg', 'pyproject.toml', 'README.md', 'cocker.py', 'cockerinit.py'):
        shutil.copy(os.path.join(REPO, part), str(src / part))
    for part in ('shbin', 'man'):
        shutil.copytree(os.path.join(REPO, part), str(src / part))
    prefix = tmp_path / 'prefix'
    # offline: no build isolation, no index (tests/run.sh installed setuptools and wheel)
    p = subprocess.Popen([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                          '--no-build-isolation', '--no-index',
                          '--prefix', str(prefix), str(src)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-2000:]
    installed = set(os.listdir(str(prefix / 'bin')))
    scripts = set(f for f in os.listdir(SHBIN) if f.endswith('.sh'))
    assert scripts | {'cocker'} <= installed
    assert 'cockerinit' not in installed, 'cockerinit is PID 1, found beside cocker.py, no command'
    assert os.path.exists(os.path.join(str(prefix), 'lib')) and any(
        f == 'cockerinit.py' for _, _, files in os.walk(str(prefix / 'lib')) for f in files)
    assert os.path.exists(str(prefix / 'share' / 'cocker' / 'cocker.bash-completion'))
    assert os.path.exists(str(prefix / 'share' / 'man' / 'man1' / 'cocker.1'))
    unit = str(prefix / 'lib' / 'systemd' / 'system' / 'cocker-repo-server.service')
    assert 'ExecStart=cocker -a repo_server --listen' in open(unit).read()
    unit = str(prefix / 'lib' / 'systemd' / 'system' / 'cocker-autostart.service')
    assert 'ExecStart=-cocker -a autostart' in open(unit).read()
