from django.urls import path

from parallel_render.metrics.views import metrics
from tests.testapp import views

urlpatterns = [
    path("async/<str:name>/", views.async_page, name="async_page"),
    path("from_string/", views.from_string, name="from_string"),
    path("gen/<str:name>", views.generated, name="generated"),
    path("st-gen/<str:name>", views.generated_streamed, name="generated_streamed"),
    path("form/", views.form_view, name="form"),
    path("json/", views.json_view, name="json"),
    path("metrics/", metrics, name="metrics"),
    path("json_of_render/", views.json_of_render, name="json_of_render"),
    path("effects/", views.effects, name="effects"),
    path("p/<str:name>/", views.page, name="page"),
    path("tr/<str:name>/", views.page_tr, name="page_tr"),
    path("st/<str:name>/", views.page_streamed, name="page_streamed"),
    path("st-decorated/<str:name>/", views.page_stream_decorated, name="page_stream_decorated"),
    path("st-cbv/<str:name>/", views.page_stream_cbv, name="page_stream_cbv"),
    path("st-rendered/<str:name>/", views.page_stream_rendered, name="page_stream_rendered"),
    path("st-async/<str:name>/", views.async_page_streamed, name="async_page_streamed"),
    path("outstanding/", views.outstanding, name="outstanding"),
    path("pages_on_node/", views.pages_on_node, name="pages_on_node"),
]
