"""Liveness of supervisors and beats, read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..conf import supervisor_settings
from ..models import ProcessHeartbeat
from .display import age, pretty_json


@admin.register(ProcessHeartbeat)
class ProcessHeartbeatAdmin(admin.ModelAdmin):
    list_display = ("kind", "name", "started_at", "last_seen", "seen", "alive")
    list_filter = ("kind",)
    ordering = ("kind", "-last_seen")
    readonly_fields = ("kind", "name", "started_at", "last_seen", "seen", "alive", "stats_pretty")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Removing the row of a process that is gone for good is harmless: a live one recreates it.
        return super().has_delete_permission(request, obj)

    @admin.display(description=_("last seen"))
    def seen(self, obj: ProcessHeartbeat) -> str:
        return age(obj.last_seen)

    @admin.display(description=_("alive"), boolean=True)
    def alive(self, obj: ProcessHeartbeat) -> bool:
        return (timezone.now() - obj.last_seen).total_seconds() <= supervisor_settings.stale_after

    @admin.display(description=_("last cycle"))
    def stats_pretty(self, obj: ProcessHeartbeat) -> str:
        return pretty_json(obj.stats)
