"""``accelerate launch`` for ``./launch.sh``: the same arguments, but a job that fails ends the launcher with the
job's own exit code (2 for bad input, 130 for Ctrl-C) and without the launcher's traceback, so the job's one
``error:`` line is the last thing a user reads.

    python -m catdog.launcher --multi_gpu --num_processes 2 jobs/train.py ...
"""
from __future__ import annotations

import logging
import subprocess
import sys


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the job has said what went wrong
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as exc:  # one process
        return exc.returncode
    except ChildFailedError as exc:  # several: the first that failed
        first = min(exc.failures.values(), key=lambda failure: failure.timestamp)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
