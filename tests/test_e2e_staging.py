"""Every action that writes an image, killed -9 at a sweep of moments of its run.

Each action is run once uncut (its duration and the image it makes: the reference), then
started again and again in a session of its own and killed with SIGKILL to the whole
process group (cocker and its tar, cp or ssh) right at the start and at moments spread
over that duration.  After each kill the next command is a listing, `cocker -s images`, and
then:

    nothing hidden is left: no entry whose name starts with '.' at depth 1 or 2 of
    COCKER_HOME/images, nor at depth 1 of COCKER_HOME/containers (whatever the staging
    directories are called: the listing, the next command, must have removed dead ones);

    the image is whole or absent: listed by -s images with the reference's very tree in its
    rlayer, or not there at all (and where it replaced a version with -f, the old or the
    new one is there, never none).

Every kill point is judged on its own: what it left is recorded, then removed, before the
next one.  The image is the test image (36 MB, some 200 files): a fraction of a second to a
second a run, the whole file in half a minute.
"""

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from conftest import cocker_process, container_path, unique_names, wait_for

KILL_POINTS = 7         # moments spread over an uncut run, besides one right at the start


def hidden_entries(home):
    """Hidden names at depth 1 and 2 of images/ and at depth 1 of containers/."""
    found = []
    images = os.path.join(home, 'images')
    for entry in sorted(os.listdir(images)) if os.path.isdir(images) else []:
        path = os.path.join(images, entry)
        if entry.startswith('.'):
            found.append(path)
        elif os.path.isdir(path):
            found += [os.path.join(path, e) for e in sorted(os.listdir(path)) if e.startswith('.')]
    containers = os.path.join(home, 'containers')
    if os.path.isdir(containers):
        found += [os.path.join(containers, e) for e in sorted(os.listdir(containers))
                  if e.startswith('.')]
    return found


def tree(root):
    """What a copy must keep of a tree: each entry's path, type and mode, owner, size (files),
    target (links) and device (nodes, whiteouts); None where root is no directory."""
    if not os.path.isdir(root):
        return None
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            extra = (st.st_size if stat.S_ISREG(st.st_mode) else
                     os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                     st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None)
            entries.append((os.path.relpath(path, root), st.st_mode, st.st_uid, st.st_gid, extra))
    return sorted(entries, key=repr)


def listed_versions(cocker, name):
    """The versions of image `name` that -s images lists."""
    r = cocker('-s', 'images')
    assert r.rc == 0, r
    return [l.split()[1] for l in r.out.splitlines()[2:] if l.split()[:1] == [name]]


def remove_entry(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def group_alive(pgid):
    """Whether a process of group pgid still runs (zombies, which write nothing, left out)."""
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != 'Z':
            return True
    return False


class Sweep(object):
    """One action's runs.  argv(): its arguments for the next run (prepare() first makes
    what that run needs); image: the (name, version) it writes; replace: whether it
    replaces an existing version (-f), which must then never go missing."""

    replace = False

    def __init__(self, home, cocker, image):
        self.home, self.cocker, self.image = home, cocker, image

    def prepare(self):
        pass

    def source(self):
        """The tree the image's rlayer must hold: here the test image's."""
        return tree(os.path.join(self.home, 'images', 'test', '_', 'rlayer'))

    def ref(self):
        name, version = self.image
        return name if version == '_' else '%s:%s' % (name, version)

    def image_path(self, *parts):
        return os.path.join(self.home, 'images', self.image[0], self.image[1], *parts)

    def check_extra(self, present):
        """Problems of what else the action touches (none here)."""
        return []

    def reset(self):
        """Back to the state before a run: the image written is removed."""
        if os.path.isdir(self.image_path()):
            r = self.cocker('-a', 'del_image', '-m', self.ref(), '-f')
            assert r.rc == 0, r


class InstallTest(Sweep):
    replace = True

    def argv(self):
        return ['-a', 'install_test', '--version', self.image[1], '-f']

    def reset(self):
        if not os.path.isdir(self.image_path()):        # only after a failure
            r = self.cocker('-a', 'install_test', '--version', self.image[1])
            assert r.rc == 0, r


class Import(Sweep):
    def __init__(self, home, cocker, image, archive):
        Sweep.__init__(self, home, cocker, image)
        self.archive = archive

    def argv(self):
        return ['-a', 'import', '--image-file', self.archive, '-m', self.ref()]


class Spull(Sweep):
    def __init__(self, home, cocker, image, address):
        Sweep.__init__(self, home, cocker, image)
        self.address = address

    def argv(self):
        return ['-a', 'spull', '-m', self.ref(), '--srepo', self.address]


class CopyImage(Sweep):
    def argv(self):
        return ['-a', 'copy_image', '--from-image', 'test', '--to-image', self.ref()]


class ToImage(Sweep):
    """A new stopped container with files of its own in its layer, for every run; where the
    image did not come, the container must be there still, its layer whole."""

    def __init__(self, home, cocker, image, names):
        Sweep.__init__(self, home, cocker, image)
        self.names = names
        self.container = None

    def prepare(self):
        self.container = self.names('tim')
        r = self.cocker('-a', 'create', '-m', 'test', '-c', self.container)
        assert r.rc == 0, r
        rwlayer = container_path(self.home, self.container, 'rwlayer')
        for d in range(20):
            os.makedirs(os.path.join(rwlayer, 'data', 'd%02d' % d))
            for f in range(20):
                with open(os.path.join(rwlayer, 'data', 'd%02d' % d, 'f%02d' % f), 'w') as out:
                    out.write('%d/%d\n' % (d, f) * (d + 1))
        os.symlink('data/d00/f00', os.path.join(rwlayer, 'link'))
        self.layer = tree(rwlayer)

    def source(self):
        return self.layer

    def argv(self):
        return ['-a', 'to_image', '--from-container', self.container, '--to-image', self.ref()]

    def check_extra(self, present):
        if present:
            return []
        layer = tree(container_path(self.home, self.container, 'rwlayer'))
        if layer != self.layer:
            return ['no image, and container %s %s' % (
                self.container, 'is gone' if layer is None else 'has lost part of its layer')]
        return []

    def reset(self):
        Sweep.reset(self)
        if os.path.isdir(container_path(self.home, self.container)):
            r = self.cocker('-a', 'destroy', '-c', self.container, '-h', '-f')
            assert r.rc == 0, r


@pytest.fixture
def sweep(request, cocker, test_image, names, home, tmp_path):
    """The Sweep of the action named by the test's parameter; whatever it wrote is removed
    afterwards, pass or fail."""
    action = request.param
    new_name = unique_names('kill')
    image = ('test', new_name()) if action == 'install_test' else (new_name(), '1')
    if action == 'install_test':
        r = cocker('-a', 'install_test', '--version', image[1])
        assert r.rc == 0, r
        s = InstallTest(home, cocker, image)
    elif action in ('import', 'spull'):
        r = cocker('-a', 'export', '-m', test_image, cwd=str(tmp_path))
        assert r.rc == 0, r
        archive = str(tmp_path / 'test.cockerimage')
        if action == 'import':
            s = Import(home, cocker, image, archive)
        else:
            repo = request.getfixturevalue('repo')
            # the archive as spush would leave it, under the name spull asks for
            pulled = os.path.join(repo.home, '%s:%s.cockerimage' % image)
            shutil.copy(archive, pulled)
            with open(archive + '.sha256') as f:
                digest = f.read().split()[0]
            with open(pulled + '.sha256', 'w') as f:
                f.write('%s  %s\n' % (digest, os.path.basename(pulled)))
            for path in (pulled, pulled + '.sha256'):
                shutil.chown(path, repo.user, None)
            s = Spull(home, cocker, image, repo.address)
    elif action == 'to_image':
        s = ToImage(home, cocker, image, names)
    else:
        s = CopyImage(home, cocker, image)
    yield s
    for path in hidden_entries(home):
        remove_entry(path)
    if os.path.isdir(s.image_path()):
        r = cocker('-a', 'del_image', '-m', s.ref(), '-f')
        assert r.rc == 0, r
    name_dir = os.path.join(home, 'images', image[0])
    if image[0] != 'test' and os.path.isdir(name_dir) and not os.listdir(name_dir):
        os.rmdir(name_dir)


def start(home, argv):
    """The action in a session of its own, so that a kill of its group takes its children."""
    return cocker_process(home, *argv, start_new_session=True)


@pytest.mark.parametrize('sweep', ['install_test', 'import', 'spull', 'to_image', 'copy_image'],
                         indirect=True)
def test_an_image_write_killed_at_any_moment_leaves_it_whole_or_absent(sweep, cocker, home):
    sweep.prepare()
    source = sweep.source()
    begun = time.monotonic()
    p = start(home, sweep.argv())
    out, err = p.communicate(timeout=120)
    duration = time.monotonic() - begun
    assert (p.returncode, out, err) == (0, b'OK\n', b''), (sweep.argv(), out, err)
    assert sweep.image[1] in listed_versions(cocker, sweep.image[0])
    assert tree(sweep.image_path('rlayer')) == source, 'an uncut run makes the whole image'
    assert not hidden_entries(home), 'an uncut run leaves nothing hidden'
    sweep.reset()
    problems, outcomes = [], []
    for point in [0.0] + [duration * i / (KILL_POINTS + 1) for i in range(1, KILL_POINTS + 1)]:
        sweep.prepare()
        source = sweep.source()
        p = start(home, sweep.argv())
        if point:
            try:
                p.wait(timeout=point)
            except subprocess.TimeoutExpired:
                pass
        finished = p.poll() is not None
        if not finished:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        wait_for(lambda: not group_alive(p.pid), what='the killed group to end')
        label = ('ended (status %d) before %.3f s' % (p.returncode, point) if finished else
                 'killed at %.3f s of %.3f s' % (point, duration))
        # the next command: a listing
        present = sweep.image[1] in listed_versions(cocker, sweep.image[0])
        hidden = hidden_entries(home)
        if hidden:
            problems.append('%s: hidden entries left after -s images: %s' % (
                label, ', '.join(os.path.relpath(h, home) for h in hidden)))
        if present:
            if tree(sweep.image_path('rlayer')) != source:
                problems.append('%s: %s listed but its rlayer is not the whole image'
                                % (label, sweep.ref()))
        elif os.path.lexists(sweep.image_path()):
            problems.append('%s: %s not listed but %s is there' % (
                label, sweep.ref(), os.path.relpath(sweep.image_path(), home)))
        elif sweep.replace:
            problems.append('%s: %s replaced with -f is gone: neither the old nor the new'
                            % (label, sweep.ref()))
        problems += ['%s: %s' % (label, text) for text in sweep.check_extra(present)]
        outcomes.append('%s: %s' % (label, 'whole' if present else 'absent'))
        # each point on its own: what this one left goes before the next
        for path in hidden:
            remove_entry(path)
        if not present:
            remove_entry(sweep.image_path())
        sweep.reset()
    assert not problems, '%s:\n%s\n(outcomes: %s)' % (
        ' '.join(sweep.argv()), '\n'.join(problems), '; '.join(outcomes))
