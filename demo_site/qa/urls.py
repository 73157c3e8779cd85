from django.urls import path

from . import views

app_name = "qa"

urlpatterns = [
    path("", views.index, name="index"),
    path("q/<int:pk>/", views.question_detail, name="question"),
    path("trivial/", views.trivial, name="trivial"),
]
