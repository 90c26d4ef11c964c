#!/usr/bin/python
"""Documentation of the cla2.mlu.cla2_follow action (plugins/action/cla2_follow.py does the work)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: cla2_follow
short_description: Follow one cla2 job to its end, in constant memory, with its progress on screen
description:
  - Follows a job that C(cla2 run) started in the runtime container, one shell command on the host per round,
    reading the files C(cla2 run) keeps in the run folder (the supervisor's lock, C(NAME.job.json),
    C(NAME.status.json), C(NAME.log)).
  - Prints a progress line (step / total, loss, tokens/s, ETA) whenever the job moved, at most every
    O(progress_seconds).
  - Succeeds when the job succeeded; fails with the tail of its log when it failed or its supervisor is gone.
  - After O(timeout) it stops following; the job goes on, and a re-run attaches to it again.
version_added: 0.1.0
author: cla2 kit
options:
  run_dir:
    description: The run folder on the host (C(cla2 run)'s C(--run-dir)).
    type: path
    required: true
  name:
    description: The job's name in the run folder.
    type: str
    required: true
  poll:
    description: Seconds between rounds.
    type: float
    default: 10
  timeout:
    description: Seconds to follow the job before giving up following (the job itself goes on).
    type: float
    default: 86400
  progress_seconds:
    description: Least seconds between two progress lines.
    type: float
    default: 30
  tail:
    description: Log lines shown in the failure message.
    type: int
    default: 30
attributes:
  check_mode:
    support: none
    description: Skipped in check mode (a job is not started there, so there is nothing to follow).
notes:
  - An action plugin; this file holds its documentation. Used by the C(cla2.mlu.cla2) role (tasks/job.yml).
"""

EXAMPLES = r"""
- name: Follow the fine-tuning job to its end
  cla2.mlu.cla2_follow:
    run_dir: /data/outputs/sft-1
    name: finetune
    poll: 10
"""

RETURN = r"""
state:
  description: The job's last state (succeeded, failed, running when following timed out).
  returned: when not in check mode
  type: str
rc:
  description: The job's exit status, once it ended.
  returned: when the job ended
  type: int
rounds:
  description: How many rounds the follower ran.
  returned: always
  type: int
seconds:
  description: How long it followed.
  returned: always
  type: float
progress:
  description: The job's last status (C(NAME.status.json)).
  returned: always
  type: dict
job:
  description: The supervisor's last record (C(NAME.job.json)).
  returned: always
  type: dict
"""
