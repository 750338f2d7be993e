from django.db import migrations, models
from django.db.models.functions import Now


def skip_extra_held_runs(apps, schema_editor):
    """Before the constraint: where a race left several held runs of one schedule, keep the earliest
    slot held and record the others ``skipped`` (as the overlap policy would have), so it can be built."""
    SupervisedRun = apps.get_model("supervisor_app", "SupervisedRun")
    held = SupervisedRun.objects.filter(status="queued", next_check_at__isnull=True, periodic_task__isnull=False)
    seen = set()
    extra = []
    for pk, pt_id in held.order_by("periodic_task_id", "scheduled_for", "pk").values_list("pk", "periodic_task_id"):
        if pt_id in seen:
            extra.append(pk)
        seen.add(pt_id)
    SupervisedRun.objects.filter(pk__in=extra).update(
        status="skipped",
        finished_at=Now(),
        last_error="queue_one: another run of this schedule was already held",
    )


class Migration(migrations.Migration):
    dependencies = [
        ("django_celery_beat", "0019_alter_periodictasks_options"),
        ("supervisor_app", "0009_pause_after_failures"),
    ]

    operations = [
        migrations.RunPython(skip_extra_held_runs, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="supervisedrun",
            constraint=models.UniqueConstraint(
                condition=models.Q(
                    ("next_check_at__isnull", True), ("periodic_task__isnull", False), ("status", "queued")
                ),
                fields=("periodic_task",),
                name="supervisor_run_one_held",
            ),
        ),
    ]
