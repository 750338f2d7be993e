"""A periodic task's arguments checked where they enter (the admin form), reported where they are
stored (system check W010) and left out where they are read (the beat, the supervisor's schedule
phase), one bad schedule never holding up the others (issue 13, item 3).

django-celery-beat accepts any JSON as ``args`` and ``kwargs``; ``[1]`` as keyword arguments used to
make the beat fail to record every schedule firing in the same batch. On the database, no broker:
publishes are captured by the ``sent`` fixture.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.core import checks
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from supervisor_app import checks as supervisor_checks
from supervisor_app import registry
from supervisor_app.core import arguments
from supervisor_app.models import SupervisedRun
from supervisor_app.scheduling import definitions, firing
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db

ADD = "admin:django_celery_beat_periodictask_add"


def schedule(name: str, every: int = 60, task: str = "project.tasks.noop", **fields: Any) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(name=name, task=task, interval=interval)
    if fields:  # an UPDATE, as rows written before the form checked them (or by a script) are
        PeriodicTask.objects.filter(pk=pt.pk).update(**fields)
    return pt


# --------------------------------------------------------------------------- the rule (pure)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ("[]", "[1]", "kwargs must be a JSON object"),
        ('{"a": 1}', "{}", "args must be a JSON list"),
        ("1", "{}", "not a number"),
        ("[]", '"x"', "not a string"),
        ("[]", "null", "not null"),
        ("[", "{}", "args is not valid JSON"),
    ],
)
@pytest.mark.django_db(databases=[])
def test_arguments_of_the_wrong_json_type_are_refused_with_the_field_named(
    args: str, kwargs: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        arguments.parse_arguments(args, kwargs)


@pytest.mark.django_db(databases=[])
def test_empty_arguments_mean_none() -> None:
    assert arguments.parse_arguments("", None) == ([], {})
    assert arguments.parse_arguments('[1, "a"]', '{"k": [1]}') == ([1, "a"], {"k": [1]})


# --------------------------------------------------------------------------- the admin form


def add_form(admin_client: Client, **fields: str) -> dict[str, Any]:
    """The data of the admin's add page as a browser posts it (inline management forms included)."""
    page = admin_client.get(reverse(ADD))
    data: dict[str, Any] = {}
    for inline in page.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        for name in management.fields:
            data[management.add_prefix(name)] = management[name].value()
    interval, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    data.update(name="form", regtask="project.tasks.noop", task="", enabled="on", interval=str(interval.pk))
    data.update(args="[]", kwargs="{}", headers="{}", total_run_count="0", priority="", expire_seconds="")
    data.update(fields)
    return data


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "kwargs",
            "[1]",
            "Keyword arguments must be a JSON object, such as {&quot;key&quot;: &quot;value&quot;}, not a list",
        ),
        ("args", '{"a": 1}', "Positional arguments must be a JSON list, such as [1, &quot;a&quot;], not an object"),
        ("args", "5", "Positional arguments must be a JSON list, such as [1, &quot;a&quot;], not a number"),
    ],
)
def test_the_admin_form_refuses_arguments_of_the_wrong_json_type(
    admin_client: Client, field: str, value: str, message: str
) -> None:
    response = admin_client.post(reverse(ADD), add_form(admin_client, **{field: value}))
    assert response.status_code == 200  # the form again, with the error
    assert message in response.content.decode()
    assert response.context["adminform"].form.errors[field]
    assert not PeriodicTask.objects.filter(name="form").exists()


def test_the_admin_form_keeps_django_celery_beats_message_for_text_that_is_not_json(admin_client: Client) -> None:
    response = admin_client.post(reverse(ADD), add_form(admin_client, kwargs="{nope"))
    assert "Unable to parse JSON" in response.content.decode()
    assert not PeriodicTask.objects.filter(name="form").exists()


def test_the_admin_form_saves_a_list_and_an_object(admin_client: Client) -> None:
    response = admin_client.post(reverse(ADD), add_form(admin_client, args='[1, "a"]', kwargs='{"k": 2}'))
    assert response.status_code == 302, response.context["adminform"].form.errors
    pt = PeriodicTask.objects.get(name="form")
    assert (pt.args, pt.kwargs) == ('[1, "a"]', '{"k": 2}')


# --------------------------------------------------------------------------- the system check


def test_the_system_check_reports_each_stored_schedule_with_bad_arguments() -> None:
    schedule("fine", args="[1]", kwargs='{"a": 1}')
    schedule("kwargs-list", kwargs="[1]")
    schedule("args-object", task="project.tasks.plain_noop", args='{"a": 1}')
    warnings = supervisor_checks.check_schedule_arguments(databases=["default"])
    assert [w.id for w in warnings] == ["supervisor_app.W010"] * 2
    assert all(isinstance(w, checks.Warning) for w in warnings)  # reported, not refusing to start
    text = [w.msg for w in warnings]
    assert text == [
        "periodic task 'args-object' (project.tasks.plain_noop): args must be a JSON list, such as [1, \"a\"], "
        "not an object",
        "periodic task 'kwargs-list' (project.tasks.noop): kwargs must be a JSON object, such as "
        '{"key": "value"}, not a list',
    ]
    # Registered as a database check: run by `migrate` and `check --database default`, with the others.
    everything = checks.run_checks(databases=["default"])
    assert sum(m.id == "supervisor_app.W010" for m in everything) == 2
    # Without a database to read (a plain `manage.py check`), it reads nothing.
    assert supervisor_checks.check_schedule_arguments(databases=None) == []


def test_the_system_check_lists_a_bounded_number_of_rows() -> None:
    for n in range(supervisor_checks.REPORTED_ROWS + 3):
        schedule(f"bad-{n:03}", kwargs="[1]")
    warnings = supervisor_checks.check_schedule_arguments(databases=["default"])
    assert len(warnings) == supervisor_checks.REPORTED_ROWS + 1
    assert warnings[-1].msg == "3 more periodic tasks with bad arguments"


# --------------------------------------------------------------------------- the beat and the supervisor


def test_a_schedule_with_bad_arguments_cannot_be_defined_and_says_why() -> None:
    registry.supervised_task_names(current_app)
    pt = schedule("bad", kwargs="[1]")
    pt = PeriodicTask.objects.select_related("interval", "crontab", "supervision").get(pk=pt.pk)
    with pytest.raises(ValueError, match="kwargs must be a JSON object"):
        definitions.definition_for(pt, current_app.tasks[pt.task])


def test_a_batch_with_one_firing_of_bad_arguments_records_the_others(sent: list[Any], settings: Any) -> None:
    settings.SUPERVISOR_ALERT_GRACE = 3600.0
    registry.supervised_task_names(current_app)
    good, bad = schedule("good"), schedule("bad")
    now = timezone.now()
    loaded = PeriodicTask.objects.select_related("interval", "crontab", "supervision")
    good_def = definitions.definition_for(loaded.get(pk=good.pk), current_app.tasks[good.task])
    # Made by hand: definition_for refuses such a schedule, and the batch must not depend on it.
    bad_def = dataclasses.replace(good_def, pk=bad.pk, name=bad.name, kwargs=[1])  # type: ignore[arg-type]
    since = now - timedelta(seconds=150)
    results = firing.fire_many([firing.Firing(bad_def, since, now), firing.Firing(good_def, since, now)])
    assert isinstance(results[0], ValueError) and "kwargs must be a JSON object" in str(results[0])
    assert isinstance(results[1], firing.RecordCounts) and results[1].run >= 2
    assert SupervisedRun.objects.filter(periodic_task=good).count() == results[1].run
    assert not SupervisedRun.objects.filter(periodic_task=bad).exists()


@pytest.mark.django_db(transaction=True)
def test_the_beat_leaves_out_a_schedule_with_bad_arguments_and_records_the_others_in_the_same_tick(
    sent: list[Any], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from supervisor_app.schedulers import SupervisedEntry, SupervisedScheduler

    settings.SUPERVISOR_ALERT_GRACE = 3600.0  # the due slots are on time: run, not caught up
    anchor = timezone.now() - timedelta(seconds=150)  # two or three slots due at the first tick
    good = schedule("good", date_changed=anchor, args="[1]", kwargs='{"a": 1}')
    bad_kwargs = schedule("bad-kwargs", date_changed=anchor, kwargs="[1]")
    bad_args = schedule("bad-args", date_changed=anchor, args='{"a": 1}')
    beat = SupervisedScheduler(app=current_app)
    try:
        assert beat.tick() == 0  # the first tick fires every due supervised schedule, as one batch
        recorded = SupervisedRun.objects.filter(periodic_task=good)
        assert recorded.count() >= 2 and len(sent) == recorded.count()
        assert {(r.args[0], r.kwargs["a"]) for r in recorded} == {(1, 1)}
        assert not SupervisedRun.objects.filter(periodic_task__in=[bad_kwargs, bad_args]).exists()
        for pt, field in ((bad_kwargs, "kwargs"), (bad_args, "args")):
            assert f"schedule {pt.name!r} cannot be read ({field} must be a JSON" in caplog.text
            assert pt.name not in beat.schedule  # left out: not sent through the plain path either
        assert isinstance(beat.schedule["good"], SupervisedEntry)
    finally:
        beat.close()


def test_the_supervisor_leaves_out_a_schedule_with_bad_arguments_and_checks_the_others(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    from supervisor_app.models import SupervisionPolicy

    anchor = timezone.now() - timedelta(minutes=5)  # no beat ran since: overdue slots, past their grace
    good = schedule("good", date_changed=anchor)
    bad = schedule("bad", date_changed=anchor, kwargs="[1]")
    for pt in (good, bad):
        SupervisionPolicy.objects.create(periodic_task=pt, catch_up="none", alert_grace=timedelta(seconds=30))
    with django_capture_on_commit_callbacks(execute=True):
        run_sweep("test-supervisor")
    statuses = list(SupervisedRun.objects.filter(periodic_task=good).values_list("status", flat=True))
    assert statuses.count("missed") >= 4  # every slot past its grace, judged and alerted
    assert not SupervisedRun.objects.filter(periodic_task=bad).exists()
