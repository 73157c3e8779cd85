"""URL configuration of the demo site."""

from django.urls import include, path

urlpatterns = [
    path("", include("demo_site.qa.urls")),
]
