from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("supervisor_app", "0007_policy_choice_constraints")]

    operations = [
        migrations.AddField(
            model_name="supervisedrun",
            name="lease_token",
            field=models.UUIDField(blank=True, editable=False, null=True),
        ),
    ]
