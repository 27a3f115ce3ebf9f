#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Manage cocker containers."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
module: cocker_container
short_description: Manage cocker containers
description:
  - Creates, boots, shuts down and destroys cocker containers through the cocker command
    line, idempotently (a second run with nothing to do reports no change).
author: cocker engineers
options:
  name:
    description: The container.
    type: str
    required: true
  state:
    description: C(present) made (not booted), C(started) running, C(stopped) made and not
      running, C(absent) destroyed (shut down first).
    type: str
    choices: [present, started, stopped, absent]
    default: started
  image:
    description: The image (or C(a,b) stack) to make the container from; needed to create.
    type: str
  hostname:
    type: str
  net:
    type: str
    choices: [HOST, CUSTOM, BRIDGE]
  vip:
    type: str
  port_mappings:
    type: str
  volumes:
    type: list
    elements: str
  restart:
    description: The restart policy (no, on-failure[:MAX], always, unless-stopped).
    type: str
  autostart:
    description: The autostart priority.
    type: int
  cpus:
    type: str
  cpu_quota:
    type: str
  mem_limit:
    type: str
  pids_limit:
    type: str
  exec:
    description: A main process to boot with (single-process mode).
    type: str
  cocker_command:
    type: str
    default: cocker
  cocker_home:
    type: path
'''

EXAMPLES = r'''
- cocker.cocker.cocker_container:
    name: web1
    image: calvin:1.0
    net: BRIDGE
    port_mappings: "8080:80"
    restart: always
    autostart: 10
'''

RETURN = r'''
container:
  description: The container as cocker -s inspect describes it (null once absent).
  type: dict
  returned: always
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cocker.cocker.plugins.module_utils.cocker import COMMON_ARGS, Cocker

CREATE_OPTIONS = (('hostname', '--host'), ('net', '--net'), ('vip', '--vip'),
                  ('port_mappings', '--port-mapping'), ('restart', '--restart'),
                  ('cpus', '--cpus'), ('cpu_quota', '--cpu-quota'),
                  ('mem_limit', '--mem-limit'), ('pids_limit', '--pids-limit'))


def create_args(params):
    args = ['-a', 'create', '-m', params['image'], '-c', params['name']]
    for key, option in CREATE_OPTIONS:
        if params.get(key) is not None:
            args += [option, str(params[key])]
    for volume in params.get('volumes') or []:
        args += ['--volume', volume]
    if params.get('autostart') is not None:
        args += ['--autostart', str(params['autostart'])]
    return args


def boot_args(params):
    return ['-e', params['exec']] if params.get('exec') else []


def main():
    spec = dict(name=dict(type='str', required=True),
                state=dict(type='str', default='started',
                           choices=['present', 'started', 'stopped', 'absent']),
                image=dict(type='str'), hostname=dict(type='str'),
                net=dict(type='str', choices=['HOST', 'CUSTOM', 'BRIDGE']),
                vip=dict(type='str'), port_mappings=dict(type='str'),
                volumes=dict(type='list', elements='str'), restart=dict(type='str'),
                autostart=dict(type='int'), cpus=dict(type='str'), cpu_quota=dict(type='str'),
                mem_limit=dict(type='str'), pids_limit=dict(type='str'),
                exec=dict(type='str'))
    spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    params, cocker = module.params, Cocker(module)
    name, state = params['name'], params['state']
    found = cocker.container(name)
    steps = []
    if state == 'absent':
        if found is not None:
            steps.append(['-a', 'destroy', '-c', name, '-h'])
    elif found is None:
        if not params.get('image'):
            module.fail_json(msg="container '%s' does not exist: give image to create it"
                             % name)
        steps.append(create_args(params) + (['-b'] + boot_args(params)
                                            if state == 'started' else []))
    elif state == 'started' and found['state'] != 'running':
        steps.append(['-a', 'boot', '-c', name] + boot_args(params))
    elif state == 'stopped' and found['state'] == 'running':
        steps.append(['-a', 'shutdown', '-c', name])
    if not module.check_mode:
        for args in steps:
            cocker.run(*args)
    container = None if state == 'absent' or module.check_mode else cocker.container(name)
    module.exit_json(changed=bool(steps), container=container,
                     commands=[' '.join(s) for s in steps])


if __name__ == '__main__':
    main()
