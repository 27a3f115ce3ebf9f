"""Image archive benchmark, every figure against baselines measured in the same run:

    cockerimage   cocker -a export / -a import of a one-layer image of --size-mb, against
                  `tar czf` / `tar xzf` of the same tree (target: half their time or less)
    OCI           the same content as a 4-layer image (an image made by to_image over three
                  others exports as their stack): -a export --format oci against
                  `skopeo copy docker-archive: oci-archive:` (skopeo gzips each layer, as
                  cocker does) and `tar czf` of the four trees; -a import of that oci-archive
                  against `skopeo copy oci-archive: dir: --dest-decompress` (it checks every
                  digest and writes each layer ungzipped; cocker also unpacks them) and
                  `tar xzf` (targets: no slower than skopeo, half the time of tar)

The content is real: files copied from this host's /usr (binaries, libraries, text) until
the size is reached, installed as rlayers of a temporary COCKER_HOME.  Rounds alternate the
tools, so a drift of the machine touches all alike; medians of --repeat rounds are
reported.  skopeo is skipped with a note where it is missing.  Everything made here is
removed at the end.

    sudo /usr/bin/python3 bench/bench_images.py [--repeat N] [--size-mb 200]

Runs under Python 3.6 and newer.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (bench_home, image_bench_main, median, python_version,  # noqa: E402
                   leave_home, run_checked)


def fill_tree(target, size):
    """Copy regular files of /usr into target until `size` bytes (links and devices skipped)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk('/usr'):
        dirnames.sort()
        for name in sorted(filenames):
            source = os.path.join(dirpath, name)
            if not os.path.isfile(source) or os.path.islink(source):
                continue
            dest = os.path.join(target, os.path.relpath(source, '/usr'))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                shutil.copy2(source, dest)
            except OSError:
                continue
            total += os.path.getsize(dest)
            if total >= size:
                return total
    return total


LAYERS = 4                              #: layers of the OCI image


class ImageBench(object):

    def __init__(self, python, repeat, size):
        self.python, self.repeat, self.size = python, repeat, size
        self.home = self.env = None
        self.times = {}
        self.skopeo = shutil.which('skopeo')

    def cocker(self, *args):
        argv = [os.path.join(self.home, 'bin', 'cocker')] + list(args)
        return run_checked(argv, self.env, 'cocker ' + ' '.join(args))[0]

    def shell(self, argv, what):
        return run_checked(argv, self.env, what)[0]

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-img-', self.python, '/var/tmp')
        self.rlayer = self.image_tree('big')
        self.bytes = fill_tree(self.rlayer, self.size)
        self.files = sum(len(f) for _, _, f in os.walk(self.rlayer))
        # the OCI image: three images and one made on them by to_image (its 'base' file)
        self.stack = [self.image_tree('part%d' % n) for n in range(LAYERS - 1)]
        self.stack.append(self.image_tree('stack'))
        for n, tree in enumerate(self.stack):
            split_tree(self.rlayer, tree, n, LAYERS)
        with open(os.path.join(os.path.dirname(self.stack[-1]), 'base'), 'w') as f:
            f.write(','.join('part%d:_' % n for n in range(LAYERS - 1)))
        self.work = os.path.join(self.home, 'work')
        os.mkdir(self.work)
        os.chdir(self.work)
        self.cocker('-a', 'export', '-m', 'stack', '--format', 'docker')    # skopeo's source
        sys.stderr.write('COCKER_HOME %s, image of %d MB\n' % (self.home, self.bytes >> 20))

    def image_tree(self, name):
        rlayer = os.path.join(self.home, 'images', name, '_', 'rlayer')
        os.makedirs(rlayer)
        return rlayer

    def measure(self):
        for i in range(self.repeat + 1):            # round 0 warms the page cache
            for key, seconds in self.cockerimage_round(i) + self.oci_round(i):
                if i > 0:
                    self.times.setdefault(key, []).append(seconds)

    def cockerimage_round(self, i):
        archive = os.path.join(self.work, 'big.cockerimage')
        tarball = os.path.join(self.work, 'big.tar.gz')
        unpacked = os.path.join(self.work, 'unpacked')
        t = self.shell(['tar', 'czf', tarball, '-C', self.rlayer, '.'], 'tar czf')
        e = self.cocker('-a', 'export', '-m', 'big')        # into the cwd: self.work
        os.mkdir(unpacked)
        x = self.shell(['tar', 'xzf', tarball, '-C', unpacked], 'tar xzf')
        shutil.rmtree(unpacked)
        m = self.cocker('-a', 'import', '--image-file', archive, '-m', 'copy:%d' % i)
        self.cocker('-a', 'del_image', '-m', 'copy:%d' % i)
        self.sizes = (os.path.getsize(tarball), os.path.getsize(archive))
        return [('tar czf', t), ('export', e), ('tar xzf', x), ('import', m)]

    def oci_round(self, i):
        archive = os.path.join(self.work, 'stack.oci.tar')
        tarball = os.path.join(self.work, 'stack.tar.gz')
        unpacked = os.path.join(self.work, 'unpacked')
        images = os.path.join(self.home, 'images')
        trees = [os.path.relpath(t, images) for t in self.stack]
        found = [('oci tar czf', self.shell(['tar', 'czf', tarball, '-C', images] + trees,
                                            'tar czf')),
                 ('oci export', self.cocker('-a', 'export', '-m', 'stack', '--format', 'oci'))]
        if self.skopeo:
            copied = os.path.join(self.work, 'skopeo.oci.tar')
            found.append(('oci skopeo copy to oci-archive', self.shell(
                [self.skopeo, 'copy', '-q', 'docker-archive:stack.docker.tar',
                 'oci-archive:' + copied], 'skopeo copy')))
            os.unlink(copied)
        os.mkdir(unpacked)
        found.append(('oci tar xzf', self.shell(['tar', 'xzf', tarball, '-C', unpacked],
                                                'tar xzf')))
        shutil.rmtree(unpacked)
        found.append(('oci import', self.cocker('-a', 'import', '--image-file', archive, '-m',
                                                'ocicopy:%d' % i)))
        self.cocker('-a', 'del_image', '-m', 'ocicopy:%d' % i)
        if self.skopeo:
            found.append(('oci skopeo copy to dir', self.shell(
                [self.skopeo, 'copy', '-q', '--dest-decompress', 'oci-archive:' + archive,
                 'dir:' + unpacked], 'skopeo copy')))
            shutil.rmtree(unpacked)
        return found

    def cleanup(self):
        return leave_home(self.home)

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        lines = ['python %s (%s), %d repetitions, image of %d MB (%d files of /usr), as one '
                 'layer and as %d' % (self.python, python_version(self.python), self.repeat,
                                      self.bytes >> 20, self.files, LAYERS), '',
                 '%-40s %9s %9s %9s' % ('measure', 'median ms', 'min ms', 'max ms')]
        for key in sorted(self.times, key=lambda k: (k.startswith('oci'), 'import' in k or
                                                     'xzf' in k or 'dir' in k, k)):
            v = self.times[key]
            label = key if 'tar' in key or 'skopeo' in key else 'cocker -a ' + key
            lines.append('%-40s %9.0f %9.0f %9.0f' % (label, ms[key], min(v) * 1000,
                                                      max(v) * 1000))
        lines += ['', 'archive sizes: tar czf %d MB, .cockerimage %d MB' % (
            self.sizes[0] >> 20, self.sizes[1] >> 20)]
        targets = [('export', 'tar czf', 0.5), ('import', 'tar xzf', 0.5),
                   ('oci export', 'oci tar czf', 0.5), ('oci import', 'oci tar xzf', 0.5),
                   ('oci export', 'oci skopeo copy to oci-archive', 1.0),
                   ('oci import', 'oci skopeo copy to dir', 1.0)]
        for mine, floor, target in targets:
            if floor not in ms:
                lines.append('%-40s skipped: skopeo is not installed' % ('ratio ' + mine))
                continue
            ratio = ms[mine] / ms[floor]
            lines.append('%-40s %6.2f  (target <= %.1f%s)' % (
                'ratio %s / %s' % (mine, floor), ratio, target,
                '' if ratio <= target else ', MISSED'))
        print('\n'.join(lines))


def split_tree(source, target, part, parts):
    """Hard-link every parts-th file of source into target: the same content, cut into
    layers of about the same size."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            if n % parts == part:
                dest = os.path.join(target, os.path.relpath(dirpath, source), name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.link(os.path.join(dirpath, name), dest)
            n += 1


def main(argv=None):
    return image_bench_main('bench_images.py', 'cocker export/import against tar czf/xzf and skopeo (run as root).', ImageBench, argv)


if __name__ == '__main__':
    sys.exit(main())
