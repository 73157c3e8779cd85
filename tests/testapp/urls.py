from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("json/", views.json_view, name="json"),
    path("p/<str:name>/", views.page, name="page"),
    path("tr/<str:name>/", views.page_tr, name="page_tr"),
]
