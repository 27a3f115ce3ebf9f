# -*- coding: utf-8 -*-
"""Ansible connection to a cocker container of the host Ansible runs its tasks on."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
name: cocker
short_description: Run tasks in cocker containers
description:
  - Runs commands in a running cocker container with C(cocker -a run), copies files with
    C(cocker -a putfile) and C(cocker -a getfile), on the host the play runs on (use it with
    a delegate or a local inventory; cocker needs root).
author: cocker engineers
options:
  remote_addr:
    description: The container.
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_cocker_container
  cocker_command:
    description: The cocker program.
    default: cocker
    vars:
      - name: ansible_cocker_command
    env:
      - name: COCKER_COMMAND
  cocker_home:
    description: COCKER_HOME of the containers (cocker's default when not given).
    vars:
      - name: ansible_cocker_home
    env:
      - name: COCKER_HOME
'''

import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()


class Connection(ConnectionBase):
    """Commands through cocker -a run, files through putfile and getfile."""

    transport = 'cocker.cocker.cocker'
    has_pipelining = True

    def _cocker(self):
        return shlex.split(self.get_option('cocker_command'))

    def _env(self):
        env = dict(os.environ)
        home = self.get_option('cocker_home')
        if home:
            env['COCKER_HOME'] = home
        return env

    def _run(self, args, in_data=None):
        argv = self._cocker() + args
        display.vvv(u'COCKER %s' % u' '.join(argv), host=self._container())
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if in_data is not None else
                             subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=self._env())
        out, err = p.communicate(in_data)
        return p.returncode, out, err

    def _container(self):
        return self.get_option('remote_addr')

    def _connect(self):
        if not self._connected:
            rc, out, err = self._run(['-s', 'inspect', '-c', self._container()])
            if rc != 0:
                raise AnsibleConnectionFailure('cocker container %s: %s' % (
                    self._container(), to_text(err).strip()))
            if b'"state": "running"' not in out:
                raise AnsibleConnectionFailure('cocker container %s is not running'
                                               % self._container())
            self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        args = ['-a', 'run', '-c', self._container(), '--cmd', to_text(cmd)]
        if in_data is not None:
            args.append('-i')
        return self._run(args, in_data)

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        if not os.path.exists(to_bytes(in_path)):
            raise AnsibleFileNotFound('file to copy does not exist: %s' % in_path)
        rc, out, err = self._run(['-a', 'putfile', '-c', self._container(), '--src-file',
                                  in_path, '--dst-file', out_path])
        if rc != 0:
            raise AnsibleConnectionFailure('putfile %s to %s:%s failed: %s' % (
                in_path, self._container(), out_path, to_text(err).strip()))

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        rc, out, err = self._run(['-a', 'getfile', '-c', self._container(), '--src-file',
                                  in_path, '--dst-file', out_path])
        if rc != 0:
            raise AnsibleConnectionFailure('getfile %s:%s failed: %s' % (
                self._container(), in_path, to_text(err).strip()))

    def close(self):
        self._connected = False
