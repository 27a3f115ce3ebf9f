# -*- coding: utf-8 -*-
"""What cocker_container and cocker_image share: running cocker, reading its JSON."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json
import os
import shlex

COMMON_ARGS = dict(
    cocker_command=dict(type='str', default='cocker'),
    cocker_home=dict(type='path'),
)


class Cocker(object):
    """The cocker command line of a module's host."""

    def __init__(self, module):
        self.module = module
        self.argv = shlex.split(module.params['cocker_command'])
        if module.params.get('cocker_home'):
            os.environ['COCKER_HOME'] = module.params['cocker_home']

    def run(self, *args, **kw):
        """(rc, stdout, stderr); a failure ends the module unless allowed."""
        rc, out, err = self.module.run_command(self.argv + list(args))
        if rc != 0 and not kw.get('allow_failure'):
            self.module.fail_json(msg='cocker %s failed: %s' % (
                ' '.join(args[:2]), (err or out).strip()), rc=rc, stdout=out, stderr=err)
        return rc, out, err

    def json(self, *args):
        return json.loads(self.run(*args)[1])

    def container(self, name):
        """-s inspect's object, or None when there is no such container."""
        rc, out, err = self.run('-s', 'inspect', '-c', name, allow_failure=True)
        if rc != 0:
            if 'not found' in err:
                return None
            self.module.fail_json(msg='cocker -s inspect failed: %s' % err.strip(), rc=rc)
        return json.loads(out)

    def images(self):
        return self.json('-s', 'images', '--format', 'json')
