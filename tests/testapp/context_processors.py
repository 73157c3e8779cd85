class SiteInfo:
    """Something a context processor makes that cannot be sent as a value."""

    def __init__(self, path: str, agent: str) -> None:
        self.label = f"site for {path} ({agent})"


def site_info(request):
    return {"site_info": SiteInfo(request.path, request.headers.get("User-Agent", "-"))}
