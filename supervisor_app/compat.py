"""Differences between the supported Django versions (4.2 and 5.2), in one place."""

from __future__ import annotations

from typing import Any

import django
from django.db import models


def check_constraint(condition: Any, name: str) -> models.CheckConstraint:
    """``CheckConstraint(condition=…)`` on Django 5.1+, ``check=…`` before (the old name warns on 5.1+)."""
    if django.VERSION >= (5, 1):
        return models.CheckConstraint(condition=condition, name=name)
    return models.CheckConstraint(**{"check": condition, "name": name})
