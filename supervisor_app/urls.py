"""The ``metrics/`` and ``health/`` URLs: ``path("supervisor/", include("supervisor_app.urls"))``."""

from django.urls import path

from . import views

app_name = "supervisor_app"

urlpatterns = [
    path("metrics/", views.metrics, name="metrics"),
    path("health/", views.health, name="health"),
]
