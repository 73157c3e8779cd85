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
        from django.core.exceptions import ImproperlyConfigured

        from parallel_render.client import warn_if_exposed
        from parallel_render.protocol import parse_address

        try:
            warn_if_exposed(parse_address(address))
        except ImproperlyConfigured:
            pass  # e.g. port 0: the router checks the address itself
        if "--auth-key-file" not in extra and "--no-auth" not in extra:
            # Masters and workers of this site prove the key derived from SECRET_KEY. The file
            # stays (0600, in a private directory of this user): this process becomes the router.
            from parallel_render import keys
            from parallel_render.cluster import router_key_dir

            extra += ["--auth-key-file", keys.write_router_key_file(router_key_dir(address), keys.key_file_name(address))]
        os.execv(binary, [binary, "--listen", address, *extra])
