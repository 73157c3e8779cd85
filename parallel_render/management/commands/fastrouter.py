from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from parallel_render import conf


class Command(BaseCommand):
    help = "Run the fastrouter in the foreground (options after -- go to the binary)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--listen", help="unix:///path or tcp://host:port (default: PARALLEL_RENDER['ROUTER'])")
        parser.add_argument("extra", nargs="*", help="further fastrouter options, e.g. -- --max-queue 1000")

    def handle(self, *args: Any, **options: Any) -> None:
        address = options["listen"] or conf.get_config()["ROUTER"]
        if not address:
            raise CommandError("No address: pass --listen or set PARALLEL_RENDER['ROUTER'].")
        binary = conf.fastrouter_binary()
        extra = list(options["extra"])
        if address.startswith("tcp://") and "--auth-token-file" not in extra:
            # Masters and workers of this site send a token derived from SECRET_KEY.
            from parallel_render.cluster import private_socket_dir
            from parallel_render.signing import write_token_file

            extra += ["--auth-token-file", write_token_file(private_socket_dir())]
        os.execv(binary, [binary, "--listen", address, *extra])
