#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Manage cocker images."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
module: cocker_image
short_description: Manage cocker images
description:
  - Imports (from a file) or pulls (from a registry) a cocker image, or deletes one,
    idempotently.
author: cocker engineers
options:
  name:
    description: The image.
    type: str
    required: true
  version:
    description: Its version (C(_) for none).
    type: str
    default: _
  state:
    type: str
    choices: [present, absent]
    default: present
  file:
    description: An archive to import (cockerimage, docker save, oci-archive, OCI layout).
    type: path
  pull:
    description: A registry reference to pull (HOST[:PORT]/PATH/NAME[:TAG]).
    type: str
  insecure:
    description: Pull over plain HTTP or with an unverified certificate.
    type: bool
    default: false
  force:
    description: Delete even when stopped containers use it (absent).
    type: bool
    default: false
  cocker_command:
    type: str
    default: cocker
  cocker_home:
    type: path
'''

EXAMPLES = r'''
- cocker.cocker.cocker_image:
    name: nginx
    version: '1.25'
    file: /media/usb/nginx-1.25.tar
'''

RETURN = r'''
image:
  description: The image as -s images --format json lists it (null once absent).
  type: dict
  returned: always
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cocker.cocker.plugins.module_utils.cocker import COMMON_ARGS, Cocker


def find(cocker, name, version):
    for image in cocker.images():
        if image['name'] == name and image['version'] == version:
            return image
    return None


def main():
    spec = dict(name=dict(type='str', required=True), version=dict(type='str', default='_'),
                state=dict(type='str', default='present', choices=['present', 'absent']),
                file=dict(type='path'), pull=dict(type='str'),
                insecure=dict(type='bool', default=False),
                force=dict(type='bool', default=False))
    spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[('file', 'pull')])
    params, cocker = module.params, Cocker(module)
    name, version = params['name'], params['version']
    ref = name if version == '_' else '%s:%s' % (name, version)
    found = find(cocker, name, version)
    steps = []
    if params['state'] == 'absent':
        if found is not None:
            steps.append(['-a', 'del_image', '-m', ref] + (['-f'] if params['force'] else []))
    elif found is None:
        if params.get('file'):
            steps.append(['-a', 'import', '--image-file', params['file'], '-m', ref])
        elif params.get('pull'):
            steps.append(['-a', 'pull', '-m', params['pull'], '--to-image', ref] +
                         (['--insecure'] if params['insecure'] else []))
        else:
            module.fail_json(msg="image '%s' is not there: give file or pull" % ref)
    if not module.check_mode:
        for args in steps:
            cocker.run(*args)
    image = None if params['state'] == 'absent' or module.check_mode else \
        find(cocker, name, version)
    module.exit_json(changed=bool(steps), image=image, commands=[' '.join(s) for s in steps])


if __name__ == '__main__':
    main()
