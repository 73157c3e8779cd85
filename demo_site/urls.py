"""URL configuration of the demo site."""

from django.conf import settings
from django.urls import include, path

urlpatterns = [
    path("", include("demo_site.qa.urls")),
]

if getattr(settings, "TOOLBAR", False):
    urlpatterns.append(path("__debug__/", include("debug_toolbar.urls")))
