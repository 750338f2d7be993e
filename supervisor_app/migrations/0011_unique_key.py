from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_celery_beat", "0019_alter_periodictasks_options"),
        ("supervisor_app", "0010_one_held_run"),
    ]

    operations = [
        migrations.AddField(
            model_name="supervisedrun",
            name="unique_key",
            field=models.CharField(blank=True, editable=False, max_length=80, null=True),
        ),
        migrations.AddField(
            model_name="supervisedrun",
            name="unique_until",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        # No run has a key yet: the index starts empty, and stays small (runs holding a key only).
        migrations.AddConstraint(
            model_name="supervisedrun",
            constraint=models.UniqueConstraint(
                condition=models.Q(
                    ("unique_key__isnull", False),
                    models.Q(
                        ("status__in", ["queued", "retrying", "running"]),
                        ("unique_until__isnull", False),
                        _connector="OR",
                    ),
                ),
                fields=("task_name", "unique_key"),
                name="supervisor_run_unique_key",
            ),
        ),
    ]
