from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("supervisor_app", "0008_lease_token")]

    operations = [
        migrations.AddField(
            model_name="supervisionpolicy",
            name="pause_after_failures",
            field=models.PositiveIntegerField(
                blank=True,
                help_text="Disable the schedule after this many consecutive failed or dead runs. "
                "SUPERVISOR_PAUSE_AFTER_FAILURES if empty (never by default).",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="supervisionpolicy",
            name="failures_counted_from",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name="supervisionpolicy",
            name="paused_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name="supervisionpolicy",
            name="paused_reason",
            field=models.CharField(blank=True, default="", editable=False, max_length=255),
        ),
    ]
