from django.urls import path

from . import bench_views, views

app_name = "qa"

urlpatterns = [
    path("", views.index, name="index"),
    path("q/<int:pk>/", views.question_detail, name="question"),
    path("q/<int:pk>/blocks/", views.question_blocks, name="question-blocks"),
    path("q/<int:pk>/stream/", views.question_stream, name="question-stream"),
    path("trivial/", views.trivial, name="trivial"),
    path("bench/io/", bench_views.io_page, name="bench-io"),
    path("bench/cpu/", bench_views.cpu_page, name="bench-cpu"),
]
