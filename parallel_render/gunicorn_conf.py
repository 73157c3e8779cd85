"""gunicorn settings for a parallel_render node: `gunicorn -c python:parallel_render.gunicorn_conf project.wsgi`.

gunicorn's masters plus a fastrouter and its workers, with the CPU layout planned from this
machine's cores (see parallel_render.layout). `manage.py runparallel` is a supervisor that
runs gunicorn with exactly this configuration as its child; started by hand, gunicorn's
first hook turns its process into that supervisor (see parallel_render.node). gunicorn's
command-line options override the values here (`-w` sets the masters); the node's own
options come from PARALLEL_RENDER_NODE_* variables (see parallel_render.node.NodeOptions),
e.g. PARALLEL_RENDER_NODE_WORKERS=8.
"""

import os

from parallel_render.layout import plan as _plan
from parallel_render.node import NodeOptions as _NodeOptions
from parallel_render.node import child_exit, on_starting, post_fork, pre_fork  # noqa: F401 (gunicorn hooks)

bind = os.environ.get("PARALLEL_RENDER_NODE_BIND", "127.0.0.1:8000")
workers = _plan(workers=_NodeOptions.from_env().workers).masters
# A master mostly waits for its fragments: a second thread serves another page meanwhile.
# gunicorn's gthread worker, which also leaves a new connection to a master with fewer
# requests in flight (parallel_render.balance).
worker_class = "parallel_render.balance.BalancedThreadWorker"
threads = 4
# SIGTERM lets masters finish their pages for this long.
graceful_timeout = 30
timeout = 60
# Newer gunicorns open a control socket at one fixed path per user, which two nodes on one
# machine (or a test beside a running node) would fight over.
control_socket_disable = True
