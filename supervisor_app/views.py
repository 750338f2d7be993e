"""The ``metrics/`` and ``health/`` views, for scrapers, load balancers and probes."""

from __future__ import annotations

import hmac

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .conf import supervisor_settings


def _allowed(request: HttpRequest) -> bool:
    """``SUPERVISOR_METRICS_TOKEN`` set: a matching ``Authorization: Bearer`` header or staff session."""
    token = supervisor_settings.raw("METRICS_TOKEN")
    if not token:
        return True
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), str(token).encode())


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not _allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    from .ops.metrics import MISSING, available, render

    if not available():  # an optional extra: say so instead of a 500 (a system check warns too)
        return HttpResponse(MISSING, status=501, content_type="text/plain; charset=utf-8")
    body, content_type = render()
    return HttpResponse(body, content_type=content_type)


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 when supervisors (and beat, when needed) are alive and nothing is stuck; 503 otherwise."""
    from .ops.health import check_health

    try:
        report = check_health()
    except Exception as exc:  # the database is down: that is unhealthy, not a 500
        return JsonResponse({"ok": False, "problems": [f"database unavailable ({type(exc).__name__})"]}, status=503)
    data = report.as_dict()
    if not _allowed(request):
        data = {"ok": report.ok, "problems": report.problems}  # no process names for anonymous probes
    return JsonResponse(data, status=200 if report.ok else 503)
